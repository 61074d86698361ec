//! Entry point: parse the command line and hand over to the library. No logic here.
fn main() -> std::process::ExitCode {
    mtx_hpc::cli::main()
}
