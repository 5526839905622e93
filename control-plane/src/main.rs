//! `capmesh-control-plane`: see `capmesh_control_plane::Config` for the flags.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    capmesh_control_plane::main_with_args(std::env::args_os())
}
