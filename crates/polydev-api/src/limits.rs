//! The sizes and counts a request may carry: what the handlers check and
//! what the request schemas (`schema.rs`) state, from one place.

/// A wrapped 32-byte key: 3-byte header, 12-byte nonce, 32 bytes, 16-byte tag.
pub(crate) const WRAPPED_KEY_LEN: usize = 3 + 12 + 32 + 16;

/// Environment variables a request may set: how many and how long.
pub(crate) const MAX_ENV_VARS: usize = 128;
pub(crate) const MAX_ENV_NAME_BYTES: usize = 256;
pub(crate) const MAX_ENV_VALUE_BYTES: usize = 64 * 1024;

/// A command's most arguments (the program included).
pub(crate) const MAX_EXEC_ARGS: usize = 4096;

/// A command argument's most bytes: the kernel refuses longer ones
/// (MAX_ARG_STRLEN, 128 KiB with the terminating NUL).
pub(crate) const MAX_ARG_BYTES: usize = 128 * 1024 - 1;
