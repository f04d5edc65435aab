//! Chat templates: the Jinja template in the model's `tokenizer_config.json`, rendered with
//! minijinja and the helpers Hugging Face templates call.

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

const TEMPLATE_NAME: &str = "chat";

/// One chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The model's chat template, compiled once.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": …}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

/// `chat_template`: one template, or named ones of which `default` is used.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
}

fn token_text(token: Option<SpecialToken>) -> String {
    match token {
        Some(SpecialToken::Text(t) | SpecialToken::Added { content: t }) => t,
        None => String::new(),
    }
}

impl ChatTemplate {
    /// The template in `tokenizer_config.json` (its bytes), None when it has none. Fails when
    /// the file or the template does not parse.
    pub(crate) fn from_tokenizer_config(json: &[u8]) -> Result<Option<Self>, String> {
        let config: TokenizerConfig =
            serde_json::from_slice(json).map_err(|e| format!("tokenizer_config.json: {e}"))?;
        let source = match config.chat_template {
            None => return Ok(None),
            Some(TemplateField::One(source)) => source,
            Some(TemplateField::Named(named)) => {
                match named.into_iter().find(|t| t.name == "default") {
                    Some(t) => t.template,
                    None => return Ok(None),
                }
            }
        };
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| format!("chat template: {e}"))?;
        Ok(Some(Self {
            env,
            bos_token: token_text(config.bos_token),
            eos_token: token_text(config.eos_token),
        }))
    }

    /// The prompt text for `messages`, ending where the assistant's reply starts.
    pub(crate) fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("rejected").to_owned(),
                _ => format!("rendering the chat template: {e}"),
            })
    }
}

/// What templates call to reject a conversation (e.g. roles out of order).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Today's date in UTC for templates that print it (`%Y`, `%m`, `%d`, `%b`, `%B`).
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or_default() as i64;
    let (year, month, day) = civil_from_days(days);
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", name)
        .replace("%b", &name[..3])
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// The Qwen-style template of the qwen3-moe-f32 fixture.
    fn fixture_template() -> ChatTemplate {
        let json = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/qwen3-moe-f32/tokenizer_config.json"),
        )
        .expect("fixture tokenizer_config.json");
        ChatTemplate::from_tokenizer_config(&json)
            .expect("parses")
            .expect("has a template")
    }

    #[test]
    fn renders_the_fixture_template_with_a_generation_prompt() {
        let template = fixture_template();
        let text = template
            .render(&[message("system", "Be brief."), message("user", "Hi")])
            .expect("renders");
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_special_tokens_and_raise_exception_work() {
        let json = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}[{{ m['content'].strip() | upper }}]{% endfor %}{{ eos_token }}"
        });
        let template = ChatTemplate::from_tokenizer_config(json.to_string().as_bytes())
            .expect("parses")
            .expect("has a template");
        assert_eq!(
            template
                .render(&[message("user", "  hi ")])
                .expect("renders"),
            "<s>[HI]</s>"
        );
        let err = template
            .render(&[message("system", "x")])
            .expect_err("the template rejects it");
        assert_eq!(err, "no system role");
    }

    #[test]
    fn no_template_is_none_and_a_broken_one_is_an_error() {
        assert!(
            ChatTemplate::from_tokenizer_config(b"{}")
                .expect("parses")
                .is_none()
        );
        let broken = serde_json::json!({"chat_template": "{% for %}"}).to_string();
        assert!(ChatTemplate::from_tokenizer_config(broken.as_bytes()).is_err());
    }

    proptest::proptest! {
        /// Whatever clients put in messages (template syntax, quotes, control characters,
        /// any role) renders as data or is refused with a message; it never panics and is
        /// never evaluated as template code.
        #[test]
        fn arbitrary_messages_render_as_data(
            messages in proptest::collection::vec(("\\PC{0,12}", "\\PC{0,40}"), 0..6),
        ) {
            let template = fixture_template();
            let messages: Vec<ChatMessage> = messages
                .into_iter()
                .map(|(role, content)| message(&role, &content))
                .collect();
            let text = template.render(&messages).expect("the fixture template accepts any roles");
            for m in &messages {
                proptest::prop_assert!(text.contains(&m.content), "content kept verbatim");
            }
        }
    }

    #[test]
    fn days_convert_to_civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_781), (2026, 11, 24));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
