//! `tokenizer.json` through the `tokenizers` crate, `tokenizer_config.json` (eos tokens, chat
//! template), and incremental detokenization with stop strings.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{EngineError, Result};

/// What `tokenizer_config.json` says beyond the vocabulary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    /// The Jinja chat template, kept verbatim for the router to render.
    pub chat_template: Option<String>,
}

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: TokenizerConfig,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| EngineError::io(&config_path, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|source| EngineError::Json {
                path: config_path.clone(),
                source,
            })?;
            TokenizerConfig::from_json(&value)
        } else {
            TokenizerConfig::default()
        };
        Self::from_bytes(&bytes, config, path)
    }

    /// Builds a tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8], config: TokenizerConfig, path: PathBuf) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| EngineError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            inner,
            config,
            path,
        })
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// Number of ids the tokenizer can produce, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids of the end-of-sequence tokens the tokenizer config names.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.config
            .eos_token
            .iter()
            .filter_map(|t| self.token_id(t))
            .collect()
    }

    /// Encodes `text`, adding the special tokens the tokenizer's post-processor defines.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenize(e.to_string()))
    }

    /// Decodes `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| {
            EngineError::Tokenize(format!("decoding with {}: {e}", self.path.display()))
        })
    }
}

impl TokenizerConfig {
    /// Reads the fields Tandem uses; tokens may be strings or `{"content": …}` objects, and the
    /// chat template a string or a list of named templates (the `default` one is kept).
    pub fn from_json(value: &Value) -> Self {
        let token = |name: &str| match value.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        let chat_template = match value.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| items.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        Self {
            eos_token: token("eos_token"),
            bos_token: token("bos_token"),
            chat_template,
        }
    }
}

/// Turns a growing list of token ids into text deltas: never splits a UTF-8 character, and
/// holds back any tail that could still become a stop string so no stop text is ever emitted.
#[derive(Debug, Clone, Default)]
pub struct IncrementalText {
    ids: Vec<u32>,
    /// Start of the ids whose decoding is used as a prefix to diff against.
    prefix_offset: usize,
    /// End of the ids already turned into text.
    read_offset: usize,
    text: String,
    emitted: usize,
    stop_strings: Vec<String>,
}

impl IncrementalText {
    pub fn new(stop_strings: Vec<String>) -> Self {
        Self {
            stop_strings,
            ..Self::default()
        }
    }

    /// Adds one token. Returns the text safe to emit now, and whether a stop string matched
    /// (in which case the text ends just before it and no more should be pushed).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<(String, bool)> {
        self.ids.push(token);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{fffd}')
            && full.is_char_boundary(prefix.len())
        {
            let search_from = self.text.len().saturating_sub(self.longest_stop());
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            if let Some(at) = self.find_stop(search_from) {
                self.text.truncate(at);
                return Ok((self.take(self.text.len()), true));
            }
        }
        let safe = self.text.len() - self.pending_stop_prefix();
        Ok((self.take(safe), false))
    }

    /// Everything not yet emitted, for when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        self.take(self.text.len())
    }

    fn take(&mut self, upto: usize) -> String {
        let upto = upto.max(self.emitted);
        let out = self.text[self.emitted..upto].to_owned();
        self.emitted = upto;
        out
    }

    fn longest_stop(&self) -> usize {
        self.stop_strings.iter().map(String::len).max().unwrap_or(0)
    }

    fn find_stop(&self, from: usize) -> Option<usize> {
        let mut from = from;
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// Length of the longest tail of the text that is a proper prefix of a stop string.
    fn pending_stop_prefix(&self) -> usize {
        let tail_start = self.emitted;
        let mut best = 0;
        for stop in &self.stop_strings {
            for len in (1..stop.len()).rev() {
                if len <= self.text.len() - tail_start
                    && stop.is_char_boundary(len)
                    && self.text.ends_with(&stop[..len])
                {
                    best = best.max(len);
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests;
