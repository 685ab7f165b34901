//! The chat template stored in a GGUF file (`tokenizer.chat_template`), rendered with minijinja the
//! way Hugging Face's `apply_chat_template` renders it: `trim_blocks` and `lstrip_blocks` on, the
//! variables `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, the function
//! `raise_exception`, and the Python string and dict methods templates commonly call
//! (`strip`, `startswith`, `split`, `items`, `get`, ...).

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::gguf::Gguf;
use crate::format::hf::HfCheckpoint;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special-token texts it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const NAME: &str = "chat_template";

fn template_err(e: minijinja::Error) -> Error {
    // minijinja's Display omits the cause chain; include it.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::Template(msg)
}

impl ChatTemplate {
    /// The file's template, or `None` if it has none. BOS/EOS texts come from the token list.
    pub fn from_gguf(g: &Gguf) -> Result<Option<ChatTemplate>> {
        let Some(source) = g.get_str("tokenizer.chat_template") else {
            return Ok(None);
        };
        let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap_or_default();
        let text_of = |key: &str| {
            g.get_u64(key)
                .and_then(|id| tokens.get(id as usize))
                .map(|s| s.to_string())
                .unwrap_or_default()
        };
        let bos = text_of("tokenizer.ggml.bos_token_id");
        let eos = text_of("tokenizer.ggml.eos_token_id");
        ChatTemplate::new(source, &bos, &eos).map(Some)
    }

    /// A checkpoint directory's template (`chat_template.jinja` or `tokenizer_config.json`), or
    /// `None`; BOS/EOS texts come from `tokenizer_config.json`.
    pub fn from_hf(h: &HfCheckpoint) -> Result<Option<ChatTemplate>> {
        let Some(source) = &h.chat_template else {
            return Ok(None);
        };
        let bos = h.special_token_text("bos_token").unwrap_or_default();
        let eos = h.special_token_text("eos_token").unwrap_or_default();
        ChatTemplate::new(source, &bos, &eos).map(Some)
    }

    /// Compiles a template given its source and the BOS/EOS token texts.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(python_methods);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source.to_string())
            .map_err(template_err)?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn apply(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template(NAME).map_err(template_err)?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(template_err)
    }
}

fn arg_str<'a>(
    args: &'a [Value],
    i: usize,
    method: &str,
) -> std::result::Result<Option<&'a str>, minijinja::Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{method}: argument {} must be a string", i + 1),
            )
        }),
    }
}

fn strip_by<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let pred = |c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    let s = if left { s.trim_start_matches(pred) } else { s };
    if right {
        s.trim_end_matches(pred)
    } else {
        s
    }
}

/// Python `str` and `dict` methods that Hugging Face chat templates use.
fn python_methods(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let unknown = || {
        Err(minijinja::Error::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method named {method}", value.kind()),
        ))
    };
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let out: Value = match method {
                "strip" => strip_by(s, arg_str(args, 0, method)?, true, true).into(),
                "lstrip" => strip_by(s, arg_str(args, 0, method)?, true, false).into(),
                "rstrip" => strip_by(s, arg_str(args, 0, method)?, false, true).into(),
                "upper" => s.to_uppercase().into(),
                "lower" => s.to_lowercase().into(),
                "capitalize" => {
                    let mut c = s.chars();
                    match c.next() {
                        Some(f) => (f.to_uppercase().collect::<String>()
                            + &c.as_str().to_lowercase())
                            .into(),
                        None => "".into(),
                    }
                }
                "title" => {
                    let mut out = String::with_capacity(s.len());
                    let mut prev_alpha = false;
                    for c in s.chars() {
                        if prev_alpha {
                            out.extend(c.to_lowercase());
                        } else {
                            out.extend(c.to_uppercase());
                        }
                        prev_alpha = c.is_alphabetic();
                    }
                    out.into()
                }
                "startswith" | "endswith" => {
                    let Some(v) = args.first() else {
                        return Err(minijinja::Error::new(
                            ErrorKind::MissingArgument,
                            format!("{method} needs an argument"),
                        ));
                    };
                    // Python accepts a tuple of prefixes.
                    let candidates: Vec<String> = if v.kind() == ValueKind::Seq {
                        v.try_iter()?.map(|x| x.to_string()).collect()
                    } else {
                        vec![arg_str(args, 0, method)?.unwrap_or_default().to_string()]
                    };
                    let hit = candidates.iter().any(|c| {
                        if method == "startswith" {
                            s.starts_with(c.as_str())
                        } else {
                            s.ends_with(c.as_str())
                        }
                    });
                    hit.into()
                }
                "replace" => {
                    let from = arg_str(args, 0, method)?.unwrap_or_default();
                    let to = arg_str(args, 1, method)?.unwrap_or_default();
                    match args.get(2).and_then(Value::as_i64) {
                        Some(n) if n >= 0 => s.replacen(from, to, n as usize).into(),
                        _ => s.replace(from, to).into(),
                    }
                }
                "split" | "rsplit" => {
                    let sep = arg_str(args, 0, method)?;
                    let max = args.get(1).and_then(Value::as_i64).filter(|&n| n >= 0);
                    let parts: Vec<String> = match (sep, max, method) {
                        (None, _, _) => s.split_whitespace().map(str::to_string).collect(),
                        (Some(sep), Some(n), "split") => {
                            s.splitn(n as usize + 1, sep).map(str::to_string).collect()
                        }
                        (Some(sep), Some(n), _) => {
                            let mut v: Vec<String> =
                                s.rsplitn(n as usize + 1, sep).map(str::to_string).collect();
                            v.reverse();
                            v
                        }
                        (Some(sep), None, _) => s.split(sep).map(str::to_string).collect(),
                    };
                    Value::from(parts)
                }
                "find" => {
                    let needle = arg_str(args, 0, method)?.unwrap_or_default();
                    match s.find(needle) {
                        Some(b) => (s[..b].chars().count() as i64).into(),
                        None => (-1i64).into(),
                    }
                }
                "count" => (s
                    .matches(arg_str(args, 0, method)?.unwrap_or_default())
                    .count() as i64)
                    .into(),
                "join" => {
                    let Some(v) = args.first() else {
                        return Err(minijinja::Error::new(
                            ErrorKind::MissingArgument,
                            "join needs an argument",
                        ));
                    };
                    let items: Vec<String> = v.try_iter()?.map(|x| x.to_string()).collect();
                    items.join(s).into()
                }
                "isspace" => (!s.is_empty() && s.chars().all(char::is_whitespace)).into(),
                "isdigit" => (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())).into(),
                "isalpha" => (!s.is_empty() && s.chars().all(char::is_alphabetic)).into(),
                _ => return unknown(),
            };
            Ok(out)
        }
        ValueKind::Map => match method {
            "items" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    let v = value.get_item(&k)?;
                    out.push(Value::from(vec![k, v]));
                }
                Ok(Value::from(out))
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    out.push(value.get_item(&k)?);
                }
                Ok(Value::from(out))
            }
            "get" => {
                let Some(k) = args.first() else {
                    return Err(minijinja::Error::new(
                        ErrorKind::MissingArgument,
                        "get needs a key",
                    ));
                };
                let v = value.get_item(k)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => unknown(),
        },
        _ => unknown(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str) -> String {
        ChatTemplate::new(src, "<s>", "</s>")
            .unwrap()
            .apply(&[Message::new("user", "  Hi there  ")], true)
            .unwrap()
    }

    #[test]
    fn python_string_methods() {
        assert_eq!(render("{{ messages[0]['content'].strip() }}"), "Hi there");
        assert_eq!(render("{{ messages[0].content.lstrip() }}|"), "Hi there  |");
        assert_eq!(render("{{ messages[0].content.rstrip() }}|"), "  Hi there|");
        assert_eq!(render("{{ 'xxaxx'.strip('x') }}"), "a");
        assert_eq!(render("{{ messages[0].role.upper() }}"), "USER");
        assert_eq!(render("{{ 'a,b,c'.split(',') | join('+') }}"), "a+b+c");
        assert_eq!(render("{{ 'a b  c'.split() | length }}"), "3");
        assert_eq!(render("{{ 'a,b,c'.split(',', 1) | last }}"), "b,c");
        assert_eq!(
            render("{{ 'hello'.startswith('he') }} {{ 'hello'.endswith(('x','lo')) }}"),
            "True True"
        );
        assert_eq!(render("{{ 'aXbX'.replace('X', '-') }}"), "a-b-");
        assert_eq!(render("{{ 'hello world'.title() }}"), "Hello World");
        assert_eq!(
            render("{{ 'abc'.find('c') }} {{ 'abc'.find('z') }}"),
            "2 -1"
        );
        assert_eq!(render("{{ bos_token }}{{ eos_token }}"), "<s></s>");
    }

    #[test]
    fn python_dict_methods() {
        assert_eq!(
            render("{% for k, v in messages[0].items() %}{{ k }}={{ v|trim }};{% endfor %}"),
            "role=user;content=Hi there;"
        );
        assert_eq!(render("{{ messages[0].get('role') }}"), "user");
        assert_eq!(render("{{ messages[0].get('nope', 'dflt') }}"), "dflt");
    }

    #[test]
    fn errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('bad role') }}", "", "").unwrap();
        let e = t.apply(&[], false).unwrap_err().to_string();
        assert!(e.contains("bad role"), "{e}");
        let e = ChatTemplate::new("{% if %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("chat template:"), "{e}");
        let e = ChatTemplate::new("{{ 'x'.nonsense() }}", "", "")
            .unwrap()
            .apply(&[], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nonsense"), "{e}");
    }

    #[test]
    fn blocks_trim_like_hugging_face() {
        let src = "{% for m in messages %}\n  {{ m.role }}\n{% endfor %}\n";
        assert_eq!(render(src), "  user\n");
    }
}
