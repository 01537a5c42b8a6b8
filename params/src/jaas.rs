//! Kafka's JAAS configuration strings (`sasl.jaas.config`), parsed the way
//! Kafka's `JaasConfig` does with `java.io.StreamTokenizer`:
//!
//! ```text
//! LoginModuleClass controlFlag (key=value)* ;
//! ```
//!
//! Words are letters, digits, `.`, `-`, `_`, `$` (not starting with a digit or
//! `.`); anything else goes in single or double quotes, where `\` escapes as in
//! Java. `//` and `/* */` are comments. A client takes exactly one module.
//!
//! Error messages never quote option values: they may be passwords.

/// The login module's control flag (Kafka accepts and ignores it for clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Required,
    Requisite,
    Sufficient,
    Optional,
}

/// One parsed login module entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jaas {
    pub module: String,
    pub flag: Flag,
    /// Options in the order given; a repeated key keeps its last value.
    pub options: Vec<(String, String)>,
}

impl Jaas {
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Quoted(String),
    Number,
    Char(char),
}

fn is_word_start(c: char) -> bool {
    c.is_ascii_alphabetic() || matches!(c, '-' | '_' | '$') || (c as u32) >= 0x80
}

fn is_word_part(c: char) -> bool {
    is_word_start(c) || c.is_ascii_digit() || c == '.'
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c <= ' ' {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' && chars[i] != '\r' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            loop {
                if i + 1 >= chars.len() {
                    return Err("unterminated /* comment".into());
                }
                if chars[i] == '*' && chars[i + 1] == '/' {
                    i += 2;
                    break;
                }
                i += 1;
            }
        } else if c == '"' || c == '\'' {
            let (value, next) = quoted(&chars, i)?;
            out.push(Token::Quoted(value));
            i = next;
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            out.push(Token::Number);
        } else if is_word_start(c) {
            let start = i;
            while i < chars.len() && is_word_part(chars[i]) {
                i += 1;
            }
            out.push(Token::Word(chars[start..i].iter().collect()));
        } else {
            out.push(Token::Char(c));
            i += 1;
        }
    }
    Ok(out)
}

/// A quoted string starting at `chars[start]`, with Java's escapes.
fn quoted(chars: &[char], start: usize) -> Result<(String, usize), String> {
    let quote = chars[start];
    let mut value = String::new();
    let mut i = start + 1;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err("unterminated quoted string".into());
        };
        i += 1;
        if c == quote {
            return Ok((value, i));
        }
        if c == '\n' || c == '\r' {
            return Err("line break inside a quoted string".into());
        }
        if c != '\\' {
            value.push(c);
            continue;
        }
        let Some(&e) = chars.get(i) else {
            return Err("unterminated quoted string".into());
        };
        i += 1;
        match e {
            'n' => value.push('\n'),
            't' => value.push('\t'),
            'r' => value.push('\r'),
            'b' => value.push('\u{8}'),
            'f' => value.push('\u{c}'),
            'a' => value.push('\u{7}'),
            'v' => value.push('\u{b}'),
            '0'..='7' => {
                // Up to three octal digits (the first at most 3 when three).
                let mut n = e.to_digit(8).unwrap_or(0);
                let max_digits = if e <= '3' { 3 } else { 2 };
                let mut digits = 1;
                while digits < max_digits {
                    match chars.get(i).and_then(|c| c.to_digit(8)) {
                        Some(d) => {
                            n = n * 8 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                value.push(char::from_u32(n).unwrap_or('\u{fffd}'));
            }
            other => value.push(other),
        }
    }
}

/// How an error message names an option (after the word "option"): only names the supported login
/// modules define are repeated. Anything else in a name's place may be part
/// of a value (`password=correct horse;` makes `horse` a name), so it is not.
pub fn shown(key: &str) -> String {
    const KNOWN: &[&str] = &[
        "username",
        "password",
        "tokenauth",
        "awsProfileName",
        "awsRoleArn",
        "awsRoleSessionName",
        "awsStsRegion",
        "awsDebugCreds",
        "awsMaxRetries",
        "awsMaxBackOffTimeMs",
        "awsRoleAccessKeyId",
        "awsRoleSecretAccessKey",
        "awsRoleSessionToken",
        "clientId",
        "clientSecret",
        "scope",
        "unsecuredLoginPrincipalClaimName",
        "unsecuredLoginScopeClaimName",
        "unsecuredLoginLifetimeSeconds",
    ];
    const PREFIXES: &[&str] = &[
        "unsecuredLoginStringClaim_",
        "unsecuredLoginNumberClaim_",
        "unsecuredLoginListClaim_",
        "unsecuredLoginExtension_",
    ];
    if KNOWN.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p)) {
        format!("\"{key}\"")
    } else {
        "(name not shown: it may be part of an unquoted value)".into()
    }
}

/// Parse a client's JAAS configuration: exactly one login module.
pub fn parse(s: &str) -> Result<Jaas, String> {
    let mut tokens = tokenize(s)?.into_iter();
    let mut entries = Vec::new();
    while let Some(first) = tokens.next() {
        entries.push(entry(first, &mut tokens)?);
    }
    match entries.len() {
        1 => Ok(entries.pop().expect("one entry")),
        0 => Err("no login module given".into()),
        n => Err(format!("{n} login modules given; a Kafka client takes exactly one")),
    }
}

/// One login module entry, from its class name (`first`) to its semicolon.
fn entry(first: Token, tokens: &mut impl Iterator<Item = Token>) -> Result<Jaas, String> {
    let Token::Word(module) = first else { return Err("expected a login module class name".into()) };
    let flag = flag(&module, tokens.next())?;
    let mut options: Vec<(String, String)> = Vec::new();
    loop {
        let key = match tokens.next() {
            None => return Err("JAAS config entry not terminated by a semicolon".into()),
            Some(Token::Char(';')) => break,
            Some(Token::Word(k)) | Some(Token::Quoted(k)) => k,
            Some(Token::Number) => return Err("an option name may not start with a digit".into()),
            Some(Token::Char(c)) => return Err(format!("unexpected '{c}' where an option name belongs")),
        };
        let value = value(&key, tokens)?;
        options.retain(|(k, _)| *k != key);
        options.push((key, value));
    }
    Ok(Jaas { module, flag, options })
}

fn flag(module: &str, token: Option<Token>) -> Result<Flag, String> {
    let (Some(Token::Word(f)) | Some(Token::Quoted(f))) = token else {
        return Err(format!("login module control flag not specified for {module}"));
    };
    match f.to_ascii_lowercase().as_str() {
        "required" => Ok(Flag::Required),
        "requisite" => Ok(Flag::Requisite),
        "sufficient" => Ok(Flag::Sufficient),
        "optional" => Ok(Flag::Optional),
        _ => Err(format!("invalid login module control flag \"{f}\" (use required)")),
    }
}

/// `=value` after the option `key`.
fn value(key: &str, tokens: &mut impl Iterator<Item = Token>) -> Result<String, String> {
    if tokens.next() != Some(Token::Char('=')) {
        return Err(format!("value not specified for option {} (write name=\"value\")", shown(key)));
    }
    match tokens.next() {
        Some(Token::Word(v)) | Some(Token::Quoted(v)) => Ok(v),
        Some(Token::Number) => {
            Err(format!("the value of option {} starts with a digit: put it in double quotes", shown(key)))
        }
        _ => Err(format!(
            "value not specified for option {} (quote values that contain characters other than \
             letters, digits, '.', '-', '_' and '$')",
            shown(key)
        )),
    }
}
