//! `vmm`: boots one guest on /dev/kvm. See `vmm --help`.

use std::process::ExitCode;

use vmm::config::{parse_args, Command, USAGE};
use vmm::{error_chain, VmExit, Vmm};

/// Exit status for configuration and start-up errors.
const ERROR_EXIT_CODE: u8 = 1;

fn main() -> ExitCode {
    vmm::logger::init();
    vmm::raise_fd_limit();
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(ERROR_EXIT_CODE);
        }
    };
    let vmm = match Vmm::build(&config) {
        Ok(vmm) => vmm,
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(ERROR_EXIT_CODE);
        }
    };
    match vmm.run(true, Vec::new()) {
        Ok(exit) => {
            match &exit {
                VmExit::Crash(what) => eprintln!("vmm: guest crashed: {what}"),
                VmExit::Stopped(why) => eprintln!("vmm: stopped by {why}"),
                VmExit::Reset => eprintln!("vmm: guest reset the machine"),
                VmExit::GuestStatus(_) => {}
            }
            ExitCode::from(exit.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            ExitCode::from(ERROR_EXIT_CODE)
        }
    }
}
