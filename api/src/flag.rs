//! The error of a flag value (`--capability`, `--dependency`) that could not be read. Its own
//! module because both flag forms use it: the registration's and the dependency's.

/// A flag value that could not be read: names the flag, the input, what is wrong and the right form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {input:?}: {problem} (use {form})")]
pub struct FlagError {
    /// The flag (`--capability`).
    pub flag: &'static str,
    /// The value as given.
    pub input: String,
    /// What is wrong with it, naming the bad part.
    pub problem: String,
    /// The right form.
    pub form: &'static str,
}
