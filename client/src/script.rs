//! The headless client's input script: what to type, click and wait for, one command a line.
//!
//! A script makes a recorded session reproducible: the same keys at the same offsets, the
//! same snapshots. It is parsed whole before the session starts, so a typo fails at once
//! instead of halfway through a benchmark. Format (also in docs/client.md):
//!
//! ```text
//! # comments and blank lines are ignored
//! type echo hello\n        # US layout; \n is Enter, \t Tab, \\ a backslash
//! key ctrl+alt+f2          # a combination: pressed in order, released in reverse
//! move 0 640 400           # pointer to scanout 0, pixel (640, 400)
//! click left               # left (default), right or middle: press and release
//! wheel -3                 # detents, positive scrolls up
//! wait 500                 # milliseconds, at most 10 minutes
//! layout 1920x1080,1280x1024
//! snapshot after-login     # DIR/after-login.png now
//! ```
//!
//! Bounds: at most [`MAX_LINES`] lines, a `wait` of at most [`MAX_WAIT_MS`], text of at most
//! [`MAX_TEXT_CHARS`] characters a line, names of letters, digits, `-`, `_` and `.`.

use std::time::Duration;

use pleiades_protocol::wire::{MAX_DIMENSION, MAX_MONITORS, buttons};

use crate::keymap::{self, KeyStroke};

/// The longest script accepted, in lines.
pub const MAX_LINES: usize = 10_000;
/// The longest `wait` (10 minutes).
pub const MAX_WAIT_MS: u64 = 600_000;
/// The most characters one `type` line may type.
pub const MAX_TEXT_CHARS: usize = 4096;
/// The largest `wheel` step, in detents.
pub const MAX_WHEEL_DETENTS: i32 = 1000;
/// The longest snapshot name.
pub const MAX_NAME_LEN: usize = 100;

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Key transitions to send in order (from `type` and `key`).
    Keys(Vec<KeyStroke>),
    Move {
        scanout: u32,
        x: u32,
        y: u32,
    },
    /// Press and release these buttons (a [`buttons`] mask).
    Click(u32),
    /// Detents; positive scrolls up.
    Wheel(i32),
    Wait(Duration),
    Layout(Vec<(u32, u32)>),
    Snapshot(String),
}

/// A command and the line it came from (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    pub command: Command,
}

/// Why a script was refused; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("the script has more than {MAX_LINES} lines")]
    TooLong,
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
}

/// Parses a whole script.
pub fn parse(text: &str) -> Result<Vec<Step>, ScriptError> {
    if text.lines().nth(MAX_LINES).is_some() {
        return Err(ScriptError::TooLong);
    }
    let mut steps = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let command = parse_line(content).map_err(|message| ScriptError::Line { line, message })?;
        steps.push(Step { line, command });
    }
    Ok(steps)
}

fn parse_line(content: &str) -> Result<Command, String> {
    let (verb, rest) = content.split_once(char::is_whitespace).unwrap_or((content, ""));
    // `type` keeps its text verbatim (spaces and `#` included); other commands allow a
    // trailing comment.
    if verb == "type" {
        let text = unescape(rest)?;
        if text.is_empty() {
            return Err("`type` needs text".into());
        }
        if text.chars().count() > MAX_TEXT_CHARS {
            return Err(format!("`type` text is longer than {MAX_TEXT_CHARS} characters"));
        }
        let strokes = keymap::text_strokes(&text).map_err(|c| {
            format!("{c:?} cannot be typed on a US keyboard (printable ASCII, \\n and \\t only)")
        })?;
        return Ok(Command::Keys(strokes));
    }
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let args: Vec<&str> = rest.split_whitespace().collect();
    let arity = |n: usize, usage: &str| {
        if args.len() == n { Ok(()) } else { Err(format!("usage: {usage}")) }
    };
    match verb {
        "key" => {
            arity(1, "key COMBO (e.g. ctrl+alt+f2)")?;
            let codes = keymap::combo_codes(args[0])?;
            let mut strokes: Vec<KeyStroke> =
                codes.iter().map(|&code| KeyStroke { code, down: true }).collect();
            strokes.extend(codes.iter().rev().map(|&code| KeyStroke { code, down: false }));
            Ok(Command::Keys(strokes))
        }
        "move" => {
            arity(3, "move SCANOUT X Y")?;
            let number =
                |s: &str, what: &str| s.parse::<u32>().map_err(|_| format!("{what} {s:?} is not a number"));
            let scanout = number(args[0], "scanout")?;
            let x = number(args[1], "x")?;
            let y = number(args[2], "y")?;
            if x >= MAX_DIMENSION || y >= MAX_DIMENSION {
                return Err(format!("position {x},{y} is beyond {MAX_DIMENSION} pixels"));
            }
            Ok(Command::Move { scanout, x, y })
        }
        "click" => {
            if args.len() > 1 {
                return Err("usage: click [left|right|middle]".into());
            }
            let mask = match args.first().copied().unwrap_or("left") {
                "left" => buttons::LEFT,
                "right" => buttons::RIGHT,
                "middle" => buttons::MIDDLE,
                other => return Err(format!("unknown button {other:?}; use left, right or middle")),
            };
            Ok(Command::Click(mask))
        }
        "wheel" => {
            arity(1, "wheel DETENTS (positive scrolls up)")?;
            let n: i32 = args[0].parse().map_err(|_| format!("{:?} is not a whole number", args[0]))?;
            if n == 0 || n.abs() > MAX_WHEEL_DETENTS {
                return Err(format!("wheel takes 1 to {MAX_WHEEL_DETENTS} detents, up or down"));
            }
            Ok(Command::Wheel(n))
        }
        "wait" => {
            arity(1, "wait MILLISECONDS")?;
            let ms: u64 =
                args[0].parse().map_err(|_| format!("{:?} is not a number of milliseconds", args[0]))?;
            if ms > MAX_WAIT_MS {
                return Err(format!("wait of {ms} ms is over the 10-minute limit ({MAX_WAIT_MS} ms)"));
            }
            Ok(Command::Wait(Duration::from_millis(ms)))
        }
        "layout" => {
            arity(1, "layout WxH[,WxH…]")?;
            let sizes = parse_layout(args[0])?;
            Ok(Command::Layout(sizes))
        }
        "snapshot" => {
            arity(1, "snapshot NAME")?;
            let name = args[0];
            if !valid_name(name) {
                return Err(format!(
                    "snapshot name {name:?} must be 1 to {MAX_NAME_LEN} letters, digits, `-`, `_` or `.`, not starting with `.`"
                ));
            }
            Ok(Command::Snapshot(name.to_owned()))
        }
        other => Err(format!(
            "unknown command {other:?}; commands: type, key, move, click, wheel, wait, layout, snapshot"
        )),
    }
}

/// `1920x1080,1280x1024` → sizes, 1 to 16 monitors of 1 to 16384 pixels a side.
pub fn parse_layout(text: &str) -> Result<Vec<(u32, u32)>, String> {
    let sizes = text
        .split(',')
        .map(|size| {
            let (w, h) =
                size.split_once(['x', 'X']).ok_or_else(|| format!("{size:?} is not WIDTHxHEIGHT"))?;
            let (w, h) = (w.parse::<u32>(), h.parse::<u32>());
            match (w, h) {
                (Ok(w @ 1..=MAX_DIMENSION), Ok(h @ 1..=MAX_DIMENSION)) => Ok((w, h)),
                _ => Err(format!("{size:?} is not WIDTHxHEIGHT with 1 to {MAX_DIMENSION} pixels a side")),
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    if sizes.is_empty() || sizes.len() > MAX_MONITORS {
        return Err(format!("a layout has 1 to {MAX_MONITORS} monitors"));
    }
    Ok(sizes)
}

/// Whether `name` is safe as a file name in the record directory.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// `\n` → newline, `\t` → tab, `\\` → backslash; any other escape is an error.
fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            other => {
                return Err(format!(
                    "unknown escape \\{}; use \\n, \\t or \\\\",
                    other.map(String::from).unwrap_or_default()
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_script_parses() {
        let script = "# log in\n\
                      type root\\n\n\
                      \n\
                      key ctrl+alt+f2   # switch\n\
                      move 1 10 20\n\
                      click\n\
                      click right\n\
                      wheel -2\n\
                      wait 250\n\
                      layout 1920x1080,1280x1024\n\
                      snapshot after-login\n\
                      type a # b\n";
        let steps = parse(script).unwrap();
        let commands: Vec<&Command> = steps.iter().map(|s| &s.command).collect();
        assert_eq!(steps[0].line, 2);
        let Command::Keys(typed) = commands[0] else { panic!("{:?}", commands[0]) };
        assert_eq!(typed.len(), 10, "r o o t and Enter, each down and up");
        assert_eq!(typed[8], KeyStroke { code: keymap::KEY_ENTER, down: true });
        assert_eq!(
            commands[1],
            &Command::Keys(vec![
                KeyStroke { code: 29, down: true },
                KeyStroke { code: 56, down: true },
                KeyStroke { code: 60, down: true },
                KeyStroke { code: 60, down: false },
                KeyStroke { code: 56, down: false },
                KeyStroke { code: 29, down: false },
            ])
        );
        assert_eq!(commands[2], &Command::Move { scanout: 1, x: 10, y: 20 });
        assert_eq!(commands[3], &Command::Click(buttons::LEFT));
        assert_eq!(commands[4], &Command::Click(buttons::RIGHT));
        assert_eq!(commands[5], &Command::Wheel(-2));
        assert_eq!(commands[6], &Command::Wait(Duration::from_millis(250)));
        assert_eq!(commands[7], &Command::Layout(vec![(1920, 1080), (1280, 1024)]));
        assert_eq!(commands[8], &Command::Snapshot("after-login".into()));
        // `type` keeps `#` and spaces: "a # b" is five characters, one of them shifted.
        let Command::Keys(typed) = commands[9] else { panic!() };
        assert_eq!(typed.len(), 5 * 2 + 2);
    }

    #[test]
    fn bad_scripts_say_which_line_and_why() {
        let bad = [
            ("wait 600001", "10-minute"),
            ("wait soon", "milliseconds"),
            ("type é", "cannot be typed"),
            ("type", "needs text"),
            ("type a\\x", "unknown escape"),
            ("key ctrl+hyper", "unknown key"),
            ("move 0 1", "usage"),
            ("move 0 1 99999", "beyond"),
            ("click both", "unknown button"),
            ("wheel 0", "detents"),
            ("layout 0x100", "WIDTHxHEIGHT"),
            (
                "layout 100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100,100x100",
                "monitors",
            ),
            ("snapshot ../etc/passwd", "snapshot name"),
            ("snapshot .hidden", "snapshot name"),
            ("dance", "unknown command"),
        ];
        for (line, why) in bad {
            let error = parse(&format!("# first\n{line}\n")).unwrap_err();
            let ScriptError::Line { line: number, message } = &error else { panic!("{error}") };
            assert_eq!(*number, 2, "{line}");
            assert!(message.contains(why), "{line}: {message}");
        }
    }

    #[test]
    fn long_scripts_are_refused() {
        let script = "wait 1\n".repeat(MAX_LINES);
        assert_eq!(parse(&script).unwrap().len(), MAX_LINES);
        let script = "# x\n".repeat(MAX_LINES + 1);
        assert_eq!(parse(&script), Err(ScriptError::TooLong));
    }
}
