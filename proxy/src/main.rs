//! `capmesh-proxy`: see `capmesh_proxy::Config` for the flags.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    capmesh_proxy::main_with_args(std::env::args_os())
}
