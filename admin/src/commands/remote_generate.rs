//! `tandemctl generate --router`: the same command-line contract and output as the
//! single-process run, streamed from a cluster.

use std::io::Write;

use tandem_common::generate::{GenerateArgs, GenerateOutput, OutputFormat, TopLogprobJson, Usage};
use tandem_common::tls::TlsArgs;
use tandem_proto::v1::{
    FinishReason, GenerateRequest, SamplingParams, TokenIds, TokenizeRequest, generate_request,
    generate_response,
};

use super::CommandError;

/// Streams one completion from `router` and prints it like the single-process run.
pub(crate) fn run(
    router: &str,
    api_key: Option<&str>,
    tls: &TlsArgs,
    args: &GenerateArgs,
) -> Result<(), CommandError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(generate(router, api_key, tls, args))
}

async fn generate(
    router: &str,
    api_key: Option<&str>,
    tls: &TlsArgs,
    args: &GenerateArgs,
) -> Result<(), CommandError> {
    let rpc_error = |status| CommandError::Rpc {
        router: router.to_owned(),
        status,
    };
    let max_tokens = u32::try_from(args.max_tokens).map_err(|_| {
        CommandError::Usage(format!(
            "--max-tokens must fit in 32 bits, got {}",
            args.max_tokens
        ))
    })?;
    let mut client = super::inference_client(router, api_key, tls).await?;
    let (prompt, prompt_token_ids) = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => (
            generate_request::Prompt::TokenIds(TokenIds { ids: ids.clone() }),
            ids.clone(),
        ),
        (None, text) => {
            let text = text.clone().unwrap_or_default();
            let ids = client
                .tokenize(TokenizeRequest {
                    model: String::new(),
                    text: text.clone(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .token_ids;
            (generate_request::Prompt::Text(text), ids)
        }
    };
    let request = GenerateRequest {
        model: String::new(),
        prompt: Some(prompt),
        sampling: Some(SamplingParams {
            temperature: Some(args.temperature),
            top_k: args.top_k.map(|k| k as u32),
            top_p: Some(args.top_p),
            min_p: Some(args.min_p),
            seed: args.seed,
            repetition_penalty: Some(args.repetition_penalty),
            presence_penalty: Some(args.presence_penalty),
            frequency_penalty: Some(args.frequency_penalty),
        }),
        max_tokens: Some(max_tokens),
        stop: args.stop.clone(),
        stop_token_ids: args.stop_token_ids.clone(),
        ignore_eos: args.ignore_eos,
        logprobs: true,
        top_logprobs: args.top_logprobs as u32,
        request_id: String::new(),
    };
    let mut stream = client
        .generate(request)
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut out = GenerateOutput {
        token_ids: Vec::new(),
        text: String::new(),
        logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        finish_reason: "length",
        usage: Usage {
            prompt_tokens: prompt_token_ids.len(),
            completion_tokens: 0,
        },
        prompt_token_ids,
        device: "cluster".to_owned(),
    };
    let stdout = std::io::stdout();
    while let Some(response) = stream.message().await.map_err(rpc_error)? {
        match response.kind {
            Some(generate_response::Kind::Chunk(chunk)) => {
                if args.output == OutputFormat::Text {
                    let mut lock = stdout.lock();
                    lock.write_all(chunk.text.as_bytes())?;
                    lock.flush()?;
                }
                out.token_ids.extend(&chunk.token_ids);
                out.text.push_str(&chunk.text);
                for l in &chunk.logprobs {
                    out.logprobs.push(l.logprob);
                    if args.top_logprobs > 0 {
                        out.top_logprobs.push(
                            l.top
                                .iter()
                                .map(|t| TopLogprobJson {
                                    token_id: t.token_id,
                                    logprob: t.logprob,
                                })
                                .collect(),
                        );
                    }
                }
            }
            Some(generate_response::Kind::Final(done)) => {
                out.finish_reason = match FinishReason::try_from(done.finish_reason) {
                    Ok(FinishReason::Stop) => "stop",
                    _ => "length",
                };
                if let Some(usage) = done.usage {
                    out.usage.completion_tokens = usage.completion_tokens as usize;
                }
            }
            // The status that ends the stream says the same, and is what gets reported.
            Some(generate_response::Kind::Error(_)) | None => {}
        }
    }
    out.finish(args.output, &mut stdout.lock())?;
    Ok(())
}
