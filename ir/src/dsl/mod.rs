//! The model DSL: lexer, parser, printer and elaborator (AST → graph IR).

pub mod ast;
pub mod elab;
pub mod lexer;
pub mod parser;
pub mod printer;

pub use elab::{elaborate, elaborate_file, DslError, Model};
pub use parser::{parse, ParseError};
