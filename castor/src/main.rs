//! `castor`: the one user-facing binary (the CLI lives in the library:
//! `castor::cli`).

fn main() {
    castor::cli::main()
}
