//! Hidden input from the terminal (a secret, a PIN) that never leaves the terminal
//! broken.
//!
//! The terminal is switched to non-canonical mode with echo *and signal keys* off, so
//! Ctrl-C arrives as a byte instead of a signal that would kill the process with echo
//! still off. The previous settings are restored on every way out — Enter, Ctrl-C,
//! Ctrl-D, an error, a panic (a drop guard) — and Ctrl-C is reported as
//! [`Error::Interrupted`] (exit 130). The line is collected in zeroizing memory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

const CTRL_C: u8 = 0x03;
const CTRL_D: u8 = 0x04;
const CTRL_U: u8 = 0x15;
const BACKSPACE: u8 = 0x08;
const DELETE: u8 = 0x7f;

/// Restores the saved terminal settings when dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

/// The settings to put back if a signal ends the process mid-prompt.
static SAVED: Mutex<Option<(i32, libc::termios)>> = Mutex::new(None);

#[allow(unsafe_code)]
fn restore(fd: i32, saved: &libc::termios) {
    // SAFETY: restores settings tcgetattr returned for the same fd.
    unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, saved) };
}

/// Puts the terminal back as a prompt found it, when a signal ends the process while
/// the prompt is up (called by `signals`).
pub(crate) fn restore_after_signal() {
    if let Some((fd, saved)) = crate::sync::lock(&SAVED).take() {
        restore(fd, &saved);
    }
}

impl RawMode {
    #[allow(unsafe_code)]
    fn enter(fd: i32) -> std::io::Result<Self> {
        // SAFETY: termios is a plain C struct; tcgetattr fills it for a valid fd and
        // reports failure through its return value, which is checked.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: see above; `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        *crate::sync::lock(&SAVED) = Some((fd, saved));
        // SAFETY: `raw` is a copy of a termios tcgetattr filled; the fd is valid.
        if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &raw) } != 0 {
            crate::sync::lock(&SAVED).take();
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        crate::sync::lock(&SAVED).take();
        restore(self.fd, &self.saved);
    }
}

/// Prints `prompt` to the terminal and reads one line without echo. Ctrl-C gives
/// [`Error::Interrupted`]; Ctrl-D on an empty line gives an empty result.
pub fn read_hidden(prompt: &str) -> Result<Zeroizing<String>> {
    let io = |e: std::io::Error| Error::Io { operation: "reading from", path: "/dev/tty".into(), source: e };
    let mut tty = File::options().read(true).write(true).open("/dev/tty").map_err(io)?;
    let mut line = Zeroizing::new(Vec::with_capacity(128));
    let outcome = {
        // Raw mode first, then the prompt: a Ctrl-C typed as soon as the prompt shows
        // must already arrive as a byte, not as a signal.
        let _raw = RawMode::enter(tty.as_raw_fd()).map_err(io)?;
        tty.write_all(prompt.as_bytes()).and_then(|()| tty.flush()).map_err(io)?;
        read_line(&mut tty, &mut line)
    };
    // The user's Enter was not echoed: end the prompt's line ourselves.
    let _ = tty.write_all(b"\n");
    outcome.map_err(io)?.then_some(()).ok_or(Error::Interrupted)?;
    let text = String::from_utf8(std::mem::take(&mut *line))
        .map_err(|e| {
            let mut bytes = e.into_bytes();
            zeroize::Zeroize::zeroize(&mut bytes);
            Error::InvalidInput("the input is not UTF-8".into())
        })
        .map(Zeroizing::new)?;
    Ok(text)
}

/// Reads bytes up to Enter into `line`, handling erase keys. `Ok(false)` on Ctrl-C.
fn read_line(tty: &mut impl Read, line: &mut Zeroizing<Vec<u8>>) -> std::io::Result<bool> {
    let mut b = [0u8; 1];
    loop {
        if tty.read(&mut b)? == 0 {
            return Ok(true);
        }
        match b[0] {
            b'\r' | b'\n' => return Ok(true),
            CTRL_C => return Ok(false),
            CTRL_D if line.is_empty() => return Ok(true),
            CTRL_U => line.clear(),
            BACKSPACE | DELETE => {
                // Remove one UTF-8 character (continuation bytes are 10xxxxxx).
                while let Some(last) = line.pop() {
                    if last & 0xC0 != 0x80 {
                        break;
                    }
                }
            }
            c => line.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(input: &[u8]) -> (bool, Vec<u8>) {
        let mut line = Zeroizing::new(Vec::new());
        let ok = read_line(&mut &input[..], &mut line).expect("read");
        (ok, line.to_vec())
    }

    #[test]
    fn line_editing_and_interrupt() {
        assert_eq!(feed(b"s3cret\r"), (true, b"s3cret".to_vec()));
        assert_eq!(feed(b"abX\x7fc\n"), (true, b"abc".to_vec()));
        assert_eq!(feed("pé\x7f\x7fq\r".as_bytes()), (true, b"q".to_vec()));
        assert_eq!(feed(b"junk\x15ok\r"), (true, b"ok".to_vec()));
        assert!(!feed(b"half\x03rest\r").0, "Ctrl-C interrupts");
        assert_eq!(feed(b"\x04"), (true, Vec::new()));
    }
}
