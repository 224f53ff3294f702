//! The `castor` CLI, built into the test package for the process-level tests.

fn main() {
    castor::cli::main()
}
