//! Lexer of the model DSL (docs/dsl.md, "Syntax").
//!
//! [`lex`] turns source text into [`Token`]s carrying 1-based line/column spans (columns
//! count characters, a tab is one column). Whitespace and `#` comments are skipped. Errors
//! use the parser's [`ParseError`] so that both report in the same format.

use super::ast::Span;
use super::parser::ParseError;

/// A token kind. Keywords and punctuation are unit variants; [`Tok::describe`] names a token
/// the way error messages do.
#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Ident(String),
    Int(i64),
    Float(f64),
    /// a string literal with its escapes resolved (`{...}` kept verbatim)
    Str(String),

    // keywords
    Config,
    Require,
    Dim,
    Input,
    State,
    Param,
    Let,
    Fn,
    For,
    In,
    If,
    Else,
    Output,
    Carry,
    Scan,
    True,
    False,

    // punctuation and operators
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Comma,
    Semi,
    Colon,
    /// `=`
    Assign,
    /// `..`
    DotDot,
    /// `...`
    Ellipsis,
    Plus,
    Minus,
    Star,
    Slash,
    /// `//`
    SlashSlash,
    Percent,
    /// `**`
    StarStar,
    At,
    /// `==`
    EqEq,
    /// `!=`
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `&&`
    AndAnd,
    /// `||`
    OrOr,
    /// `!`
    Bang,

    /// end of input
    Eof,
}

/// The keywords, in the order of docs/dsl.md.
pub const KEYWORDS: [(&str, Tok); 17] = [
    ("config", Tok::Config),
    ("require", Tok::Require),
    ("dim", Tok::Dim),
    ("input", Tok::Input),
    ("state", Tok::State),
    ("param", Tok::Param),
    ("let", Tok::Let),
    ("fn", Tok::Fn),
    ("for", Tok::For),
    ("in", Tok::In),
    ("if", Tok::If),
    ("else", Tok::Else),
    ("output", Tok::Output),
    ("carry", Tok::Carry),
    ("scan", Tok::Scan),
    ("true", Tok::True),
    ("false", Tok::False),
];

/// The keyword spelled `word`, if it is one.
pub fn keyword(word: &str) -> Option<Tok> {
    KEYWORDS.iter().find(|(w, _)| *w == word).map(|(_, t)| t.clone())
}

impl Tok {
    /// The fixed spelling of a keyword or punctuation token; `None` for identifiers,
    /// literals and end of file.
    pub fn text(&self) -> Option<&'static str> {
        use Tok::*;
        Some(match self {
            Ident(_) | Int(_) | Float(_) | Str(_) | Eof => return None,
            Config => "config",
            Require => "require",
            Dim => "dim",
            Input => "input",
            State => "state",
            Param => "param",
            Let => "let",
            Fn => "fn",
            For => "for",
            In => "in",
            If => "if",
            Else => "else",
            Output => "output",
            Carry => "carry",
            Scan => "scan",
            True => "true",
            False => "false",
            LParen => "(",
            RParen => ")",
            LBracket => "[",
            RBracket => "]",
            LBrace => "{",
            RBrace => "}",
            Comma => ",",
            Semi => ";",
            Colon => ":",
            Assign => "=",
            DotDot => "..",
            Ellipsis => "...",
            Plus => "+",
            Minus => "-",
            Star => "*",
            Slash => "/",
            SlashSlash => "//",
            Percent => "%",
            StarStar => "**",
            At => "@",
            EqEq => "==",
            Ne => "!=",
            Lt => "<",
            Le => "<=",
            Gt => ">",
            Ge => ">=",
            AndAnd => "&&",
            OrOr => "||",
            Bang => "!",
        })
    }

    /// How error messages name this token: `` `let` ``, `` `;` ``, ``identifier `foo` ``,
    /// `integer 3`, `float 1.5`, `string "abc"`, `end of file`.
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident(name) => format!("identifier `{name}`"),
            Tok::Int(v) => format!("integer {v}"),
            Tok::Float(v) => format!("float {v:?}"),
            Tok::Str(s) => format!("string {}", quote(s)),
            Tok::Eof => "end of file".to_string(),
            other => format!("`{}`", other.text().unwrap_or("?")),
        }
    }
}

/// `s` as a string literal of the DSL: in double quotes, with `"`, `\`, newline and tab
/// escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A token and where it is: `span` is its first character, `end` the position just after
/// its last character.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub kind: Tok,
    pub span: Span,
    pub end: Span,
}

/// Split `src` (named `file` in errors) into tokens. The last token is always [`Tok::Eof`],
/// placed just after the last real token (at 1:1 for an empty file).
pub fn lex(file: &str, src: &str) -> Result<Vec<Token>, ParseError> {
    let mut lx = Lexer {
        file,
        src,
        chars: src.chars().collect(),
        pos: 0,
        line: 1,
        col: 1,
    };
    let mut toks: Vec<Token> = Vec::new();
    loop {
        lx.skip_trivia();
        let span = lx.here();
        let Some(c) = lx.peek(0) else {
            let end = toks.last().map_or(Span { line: 1, col: 1 }, |t| t.end);
            toks.push(Token {
                kind: Tok::Eof,
                span: end,
                end,
            });
            return Ok(toks);
        };
        let kind = lx.token(c, span)?;
        toks.push(Token {
            kind,
            span,
            end: lx.here(),
        });
    }
}

struct Lexer<'a> {
    file: &'a str,
    src: &'a str,
    chars: Vec<char>,
    pos: usize,
    line: u32,
    col: u32,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// A character as error messages show it: `` `$` ``, control characters escaped.
fn show_char(c: char) -> String {
    if c.is_control() {
        format!("`{}`", c.escape_debug())
    } else {
        format!("`{c}`")
    }
}

impl Lexer<'_> {
    fn peek(&self, n: usize) -> Option<char> {
        self.chars.get(self.pos + n).copied()
    }

    fn here(&self) -> Span {
        Span {
            line: self.line,
            col: self.col,
        }
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek(0)?;
        self.pos += 1;
        if c == '\n' {
            self.line = self.line.saturating_add(1);
            self.col = 1;
        } else {
            self.col = self.col.saturating_add(1);
        }
        Some(c)
    }

    fn error(&self, span: Span, expected: &str, found: String) -> ParseError {
        ParseError::new(self.file, self.src, span, expected, found)
    }

    fn skip_trivia(&mut self) {
        while let Some(c) = self.peek(0) {
            match c {
                ' ' | '\t' | '\r' | '\n' => {
                    self.bump();
                }
                '#' => {
                    while let Some(c) = self.peek(0) {
                        if c == '\n' {
                            break;
                        }
                        self.bump();
                    }
                }
                _ => break,
            }
        }
    }

    /// Lex one token starting with `c` (at `span`).
    fn token(&mut self, c: char, span: Span) -> Result<Tok, ParseError> {
        if is_ident_start(c) {
            let mut word = String::new();
            while let Some(c) = self.peek(0).filter(|&c| is_ident_char(c)) {
                word.push(c);
                self.bump();
            }
            return Ok(keyword(&word).unwrap_or(Tok::Ident(word)));
        }
        if c.is_ascii_digit() {
            return self.number(span);
        }
        if c == '"' {
            return self.string(span);
        }
        let next = self.peek(1);
        let next2 = self.peek(2);
        let (tok, len) = match (c, next) {
            ('.', Some('.')) if next2 == Some('.') => (Tok::Ellipsis, 3),
            ('.', Some('.')) => (Tok::DotDot, 2),
            ('/', Some('/')) => (Tok::SlashSlash, 2),
            ('*', Some('*')) => (Tok::StarStar, 2),
            ('=', Some('=')) => (Tok::EqEq, 2),
            ('!', Some('=')) => (Tok::Ne, 2),
            ('<', Some('=')) => (Tok::Le, 2),
            ('>', Some('=')) => (Tok::Ge, 2),
            ('&', Some('&')) => (Tok::AndAnd, 2),
            ('|', Some('|')) => (Tok::OrOr, 2),
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            ('[', _) => (Tok::LBracket, 1),
            (']', _) => (Tok::RBracket, 1),
            ('{', _) => (Tok::LBrace, 1),
            ('}', _) => (Tok::RBrace, 1),
            (',', _) => (Tok::Comma, 1),
            (';', _) => (Tok::Semi, 1),
            (':', _) => (Tok::Colon, 1),
            ('=', _) => (Tok::Assign, 1),
            ('+', _) => (Tok::Plus, 1),
            ('-', _) => (Tok::Minus, 1),
            ('*', _) => (Tok::Star, 1),
            ('/', _) => (Tok::Slash, 1),
            ('%', _) => (Tok::Percent, 1),
            ('@', _) => (Tok::At, 1),
            ('<', _) => (Tok::Lt, 1),
            ('>', _) => (Tok::Gt, 1),
            ('!', _) => (Tok::Bang, 1),
            ('&', _) => return Err(self.error(span, "`&&`", show_char(c))),
            ('|', _) => return Err(self.error(span, "`||`", show_char(c))),
            ('.', _) => return Err(self.error(span, "`..` or `...`", show_char(c))),
            _ => return Err(self.error(span, "a token", show_char(c))),
        };
        for _ in 0..len {
            self.bump();
        }
        Ok(tok)
    }

    fn digits(&mut self, text: &mut String) {
        while let Some(c) = self.peek(0).filter(|&c| c.is_ascii_digit() || c == '_') {
            text.push(c);
            self.bump();
        }
    }

    /// `[0-9][0-9_]*` then an optional fraction `.[0-9][0-9_]*` (only when a digit follows
    /// the dot, so that `0..4` is `0`, `..`, `4`) and an optional exponent `e[+-]?[0-9]+`.
    fn number(&mut self, span: Span) -> Result<Tok, ParseError> {
        let mut text = String::new();
        self.digits(&mut text);
        let mut is_float = false;
        if self.peek(0) == Some('.') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            is_float = true;
            text.push('.');
            self.bump();
            self.digits(&mut text);
        }
        let mut malformed = false;
        if let Some(e @ ('e' | 'E')) = self.peek(0) {
            let digit_at = match self.peek(1) {
                Some('+' | '-') => 2,
                _ => 1,
            };
            if self.peek(digit_at).is_some_and(|c| c.is_ascii_digit()) {
                is_float = true;
                text.push(e);
                self.bump();
                if digit_at == 2 {
                    text.extend(self.bump());
                }
                self.digits(&mut text);
            } else {
                malformed = true;
                text.push(e);
                self.bump();
                if digit_at == 2 {
                    text.extend(self.bump());
                }
            }
        }
        if self.peek(0).is_some_and(is_ident_char) {
            malformed = true;
        }
        if malformed {
            while let Some(c) = self.peek(0).filter(|&c| is_ident_char(c)) {
                text.push(c);
                self.bump();
            }
            return Err(self.error(span, "a number", format!("malformed number `{text}`")));
        }
        let clean: String = text.chars().filter(|&c| c != '_').collect();
        if is_float {
            match clean.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(Tok::Float(v)),
                _ => Err(self.error(span, "a finite float", format!("`{text}`"))),
            }
        } else {
            match clean.parse::<i64>() {
                Ok(v) => Ok(Tok::Int(v)),
                Err(_) => Err(self.error(span, "an integer that fits in 64 bits", format!("`{text}`"))),
            }
        }
    }

    /// A string literal; `\"`, `\\`, `\n` and `\t` are its only escapes and it cannot span
    /// lines.
    fn string(&mut self, span: Span) -> Result<Tok, ParseError> {
        self.bump();
        let mut value = String::new();
        loop {
            match self.peek(0) {
                None | Some('\n') => return Err(self.error(span, "a closing `\"`", "unterminated string".to_string())),
                Some('"') => {
                    self.bump();
                    return Ok(Tok::Str(value));
                }
                Some('\\') => {
                    let at = self.here();
                    let resolved = match self.peek(1) {
                        Some('"') => '"',
                        Some('\\') => '\\',
                        Some('n') => '\n',
                        Some('t') => '\t',
                        None | Some('\n') => {
                            return Err(self.error(span, "a closing `\"`", "unterminated string".to_string()))
                        }
                        Some(other) => {
                            let shown = if other.is_control() {
                                other.escape_debug().to_string()
                            } else {
                                other.to_string()
                            };
                            return Err(self.error(
                                at,
                                "an escape `\\\"`, `\\\\`, `\\n` or `\\t`",
                                format!("`\\{shown}`"),
                            ));
                        }
                    };
                    self.bump();
                    self.bump();
                    value.push(resolved);
                }
                Some(c) => {
                    self.bump();
                    value.push(c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<Tok> {
        lex("t.rd", src).unwrap().into_iter().map(|t| t.kind).collect()
    }

    fn lex_err(src: &str) -> (u32, u32, String, String) {
        let e = lex("t.rd", src).unwrap_err();
        (e.line, e.col, e.expected, e.found)
    }

    #[test]
    fn ranges_and_numbers() {
        use Tok::*;
        assert_eq!(kinds("0..4"), vec![Int(0), DotDot, Int(4), Eof]);
        assert_eq!(kinds("x[..., 0:2]"), {
            vec![
                Ident("x".into()),
                LBracket,
                Ellipsis,
                Comma,
                Int(0),
                Colon,
                Int(2),
                RBracket,
                Eof,
            ]
        });
        assert_eq!(kinds("1_000 1.5 1e-6 1.0e+6 2E3 0.5..1"), {
            vec![
                Int(1000),
                Float(1.5),
                Float(1e-6),
                Float(1.0e6),
                Float(2000.0),
                Float(0.5),
                DotDot,
                Int(1),
                Eof,
            ]
        });
    }

    #[test]
    fn operators_keywords_strings_comments() {
        use Tok::*;
        let src = "let x = a // b ** c; # comment ==\n!= <= >= < > && || ! @ % / * - + scan_1 _";
        assert_eq!(kinds(src), {
            vec![
                Let,
                Ident("x".into()),
                Assign,
                Ident("a".into()),
                SlashSlash,
                Ident("b".into()),
                StarStar,
                Ident("c".into()),
                Semi,
                Ne,
                Le,
                Ge,
                Lt,
                Gt,
                AndAnd,
                OrOr,
                Bang,
                At,
                Percent,
                Slash,
                Star,
                Minus,
                Plus,
                Ident("scan_1".into()),
                Ident("_".into()),
                Eof,
            ]
        });
        assert_eq!(
            kinds(r#""a \"q\" \\ {l}\n\t""#),
            vec![Str("a \"q\" \\ {l}\n\t".into()), Eof]
        );
        for (w, t) in KEYWORDS {
            assert_eq!(kinds(w), vec![t.clone(), Eof]);
            assert_eq!(t.describe(), format!("`{w}`"));
        }
    }

    #[test]
    fn spans_are_one_based_chars() {
        let toks = lex("t.rd", "let\n  x = \"ü\" y # c\n").unwrap();
        let spans: Vec<(u32, u32)> = toks.iter().map(|t| (t.span.line, t.span.col)).collect();
        assert_eq!(spans, vec![(1, 1), (2, 3), (2, 5), (2, 7), (2, 11), (2, 12)]);
        assert_eq!(lex("t.rd", "").unwrap()[0].span, Span { line: 1, col: 1 });
    }

    #[test]
    fn lexer_errors() {
        assert_eq!(lex_err("let x = $;"), (1, 9, "a token".into(), "`$`".into()));
        assert_eq!(lex_err("a & b"), (1, 3, "`&&`".into(), "`&`".into()));
        assert_eq!(lex_err("a | b"), (1, 3, "`||`".into(), "`|`".into()));
        assert_eq!(lex_err("x.y"), (1, 2, "`..` or `...`".into(), "`.`".into()));
        assert_eq!(
            lex_err("\n  1e"),
            (2, 3, "a number".into(), "malformed number `1e`".into())
        );
        assert_eq!(
            lex_err("1e+x"),
            (1, 1, "a number".into(), "malformed number `1e+x`".into())
        );
        assert_eq!(
            lex_err("3abc"),
            (1, 1, "a number".into(), "malformed number `3abc`".into())
        );
        assert_eq!(
            lex_err("99999999999999999999"),
            (
                1,
                1,
                "an integer that fits in 64 bits".into(),
                "`99999999999999999999`".into()
            )
        );
        assert_eq!(lex_err("1e999"), (1, 1, "a finite float".into(), "`1e999`".into()));
        assert_eq!(
            lex_err("x = \"abc\ny\";"),
            (1, 5, "a closing `\"`".into(), "unterminated string".into())
        );
        assert_eq!(
            lex_err("\"abc\\"),
            (1, 1, "a closing `\"`".into(), "unterminated string".into())
        );
        assert_eq!(
            lex_err("\"a\\qb\""),
            (1, 3, "an escape `\\\"`, `\\\\`, `\\n` or `\\t`".into(), "`\\q`".into())
        );
        assert_eq!(lex_err("\u{0}"), (1, 1, "a token".into(), "`\\0`".into()));
    }
}
