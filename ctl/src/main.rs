//! `iotctl`: see the library for what each command does and `iotctl --help` for the exit codes.

fn main() -> std::process::ExitCode {
    iotctl::main()
}
