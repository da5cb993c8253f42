//! `vmm`: boots one guest on /dev/kvm. See `vmm --help`.

use std::process::ExitCode;

use vmm::config::{parse_args, Command};
use vmm::{error_chain, VmExit, Vmm};

/// Exit status for configuration and start-up errors.
const ERROR_EXIT_CODE: u8 = 1;

fn main() -> ExitCode {
    if let Err(e) = vmm::signals::block_stop_signals() {
        eprintln!("vmm: error: cannot block SIGINT/SIGTERM: {e}");
        return ExitCode::from(ERROR_EXIT_CODE);
    }
    // Guest RAM lives in this process: no same-uid process may write it through
    // /proc/PID/mem or re-open its read-write RAM fds through /proc/PID/fd.
    if let Err(e) = vmm::jail::forbid_tracing() {
        eprintln!("vmm: error: {}", error_chain(&e));
        return ExitCode::from(ERROR_EXIT_CODE);
    }
    vmm::logger::init();
    vmm::raise_fd_limit();
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(ERROR_EXIT_CODE);
        }
    };
    if let Some(level) = &config.log_level {
        if let Err(e) = vmm::logger::set_level(level) {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(ERROR_EXIT_CODE);
        }
    }
    let vmm = match Vmm::build(&config) {
        Ok(vmm) => vmm,
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(ERROR_EXIT_CODE);
        }
    };
    if let Some((uid, gid)) = config.run_as {
        if let Err(e) = vmm.ram().chown_chunks(uid, gid) {
            eprintln!("vmm: error: cannot give guest RAM to uid {uid}: {e}");
            return ExitCode::from(ERROR_EXIT_CODE);
        }
        if let Err(e) = vmm::jail::drop_privileges(uid, gid) {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(ERROR_EXIT_CODE);
        }
    }
    match vmm.run(true, Vec::new()) {
        Ok(exit) => {
            match &exit {
                VmExit::Crash(what) => eprintln!("vmm: guest crashed: {what}"),
                VmExit::Stopped(why) => eprintln!("vmm: stopped by {why}"),
                VmExit::Reset => eprintln!("vmm: guest reset the machine"),
                VmExit::PowerOff => eprintln!("vmm: guest powered off"),
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
