//! The X11 clipboard against a real X server: a private Xvfb per test, `xclip` as the local
//! application that copies and pastes. Every wait is bounded; nothing asserts on timing.

use std::io::{Read, Write};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use pleiades_clipboard::{ClipboardError, Format, LocalEvent, X11Clipboard};
use pleiades_testkit::prerequisite::{command, require};
use pleiades_testkit::wait_for;
use pleiades_testkit::xvfb::Xvfb;

/// How long anything here may take (a loaded machine, debug builds).
const WAIT: Duration = Duration::from_secs(30);
const LIMIT: usize = 32 * 1024 * 1024;

/// A private display, or `None` (skipped) when Xvfb or xclip is missing.
fn display(test: &str) -> Option<Xvfb> {
    require(test, command("Xvfb"))?;
    require(test, command("xclip"))?;
    Some(Xvfb::start(640, 480).expect("Xvfb starts"))
}

fn connect(x: &Xvfb, limit: usize) -> (X11Clipboard, Receiver<LocalEvent>) {
    X11Clipboard::connect(Some(x.display()), limit).expect("the clipboard connects to Xvfb")
}

/// The next event, within [`WAIT`].
fn next(events: &Receiver<LocalEvent>, what: &str) -> LocalEvent {
    match events.recv_timeout(WAIT) {
        Ok(event) => event,
        Err(RecvTimeoutError::Timeout) => panic!("no event within {WAIT:?} waiting for {what}"),
        Err(RecvTimeoutError::Disconnected) => panic!("the clipboard thread ended waiting for {what}"),
    }
}

fn fetch(
    clipboard: &X11Clipboard,
    events: &Receiver<LocalEvent>,
    id: u64,
    format: Format,
) -> Result<Vec<u8>, ClipboardError> {
    clipboard.fetch(id, format);
    match next(events, "the fetch's result") {
        LocalEvent::Fetched { id: got, result } if got == id => result,
        other => panic!("expected Fetched {{ id: {id} }}, got {other:?}"),
    }
}

/// `xclip -i` holding the clipboard with `data` as `target`, in the foreground (it exits when
/// it loses the selection); killed on drop.
struct Copier(Child);

impl Copier {
    fn start(x: &Xvfb, target: &str, data: &[u8]) -> Copier {
        let mut child = x
            .command("xclip")
            .args(["-selection", "clipboard", "-quiet", "-t", target, "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("xclip runs");
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(data).expect("xclip reads its input");
        drop(stdin);
        Copier(child)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `xclip -o` pasting `target` while the test answers; killed on drop.
struct Paste {
    child: Child,
    output: Receiver<Vec<u8>>,
}

impl Paste {
    fn start(x: &Xvfb, target: &str) -> Paste {
        let mut child = x
            .command("xclip")
            .args(["-o", "-selection", "clipboard", "-t", target])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("xclip runs");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stdout.read_to_end(&mut bytes);
            let _ = tx.send(bytes);
        });
        Paste { child, output }
    }

    /// Its exit status and what it printed.
    fn finish(mut self) -> (ExitStatus, Vec<u8>) {
        let bytes = self.output.recv_timeout(WAIT).expect("xclip -o ends in time");
        let status = wait_for("xclip -o to exit", WAIT, || self.child.try_wait().ok().flatten()).unwrap();
        (status, bytes)
    }
}

impl Drop for Paste {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic noise (xorshift), so that compression cannot shrink it.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A real PNG of `width`×`height` RGBA noise.
fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::NoCompression);
    let mut writer = encoder.write_header().expect("PNG header");
    writer.write_image_data(&noise((width * height * 4) as usize, 7)).expect("PNG data");
    writer.finish().expect("PNG end");
    out
}

/// Lines of numbered text, `len` bytes long, with some non-ASCII in it.
fn text(len: usize) -> Vec<u8> {
    let mut s = String::with_capacity(len + 64);
    let mut n = 0;
    while s.len() < len {
        s.push_str(&format!("line {n}: héllo ✓ the quick brown fox\n"));
        n += 1;
    }
    let mut bytes = s.into_bytes();
    bytes.truncate(len);
    // Cut on a character boundary.
    while std::str::from_utf8(&bytes).is_err() {
        bytes.pop();
    }
    bytes
}

#[test]
fn a_local_text_copy_is_announced_and_fetched_exactly() {
    let Some(x) = display("a_local_text_copy_is_announced_and_fetched_exactly") else { return };
    let (clipboard, events) = connect(&x, LIMIT);
    let text = "héllo ✓".as_bytes();
    let _copier = Copier::start(&x, "UTF8_STRING", text);
    assert_eq!(next(&events, "the copy"), LocalEvent::Grabbed(vec![Format::Text]));
    assert_eq!(fetch(&clipboard, &events, 1, Format::Text), Ok(text.to_vec()));
    // xclip lists only UTF8_STRING: a PNG is not asked for.
    assert_eq!(fetch(&clipboard, &events, 2, Format::Png), Err(ClipboardError::Unavailable(Format::Png)));
}

#[test]
fn a_local_png_copy_is_fetched_byte_for_byte() {
    let Some(x) = display("a_local_png_copy_is_fetched_byte_for_byte") else { return };
    let (clipboard, events) = connect(&x, LIMIT);
    let image = png(64, 48);
    let _copier = Copier::start(&x, "image/png", &image);
    assert_eq!(next(&events, "the copy"), LocalEvent::Grabbed(vec![Format::Png]));
    assert_eq!(fetch(&clipboard, &events, 7, Format::Png), Ok(image));
    assert_eq!(fetch(&clipboard, &events, 8, Format::Text), Err(ClipboardError::Unavailable(Format::Text)));
}

#[test]
fn a_large_local_copy_comes_through_incr_and_the_limit_holds() {
    let Some(x) = display("a_large_local_copy_comes_through_incr_and_the_limit_holds") else { return };
    let (clipboard, events) = connect(&x, LIMIT);
    let big = text(6 * 1024 * 1024);
    let _copier = Copier::start(&x, "UTF8_STRING", &big);
    assert_eq!(next(&events, "the copy"), LocalEvent::Grabbed(vec![Format::Text]));
    let fetched = fetch(&clipboard, &events, 1, Format::Text).expect("6 MiB of text");
    assert!(fetched == big, "{} bytes fetched, {} copied", fetched.len(), big.len());

    // A second peer that takes at most 1 MiB: refused, and no hang.
    let (small, small_events) = connect(&x, 1024 * 1024);
    assert_eq!(next(&small_events, "the owner at connect"), LocalEvent::Grabbed(vec![Format::Text]));
    assert_eq!(
        fetch(&small, &small_events, 2, Format::Text),
        Err(ClipboardError::TooLarge { limit: 1024 * 1024 })
    );
    // It still works: a small copy comes through.
    drop(_copier);
    let _copier = Copier::start(&x, "UTF8_STRING", b"small");
    let grabbed = loop {
        match next(&small_events, "the small copy") {
            LocalEvent::Grabbed(formats) => break formats,
            LocalEvent::Released => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(grabbed, vec![Format::Text]);
    assert_eq!(fetch(&small, &small_events, 3, Format::Text), Ok(b"small".to_vec()));
}

#[test]
fn local_pastes_of_remote_content_are_served_lazily() {
    let Some(x) = display("local_pastes_of_remote_content_are_served_lazily") else { return };
    let (clipboard, events) = connect(&x, LIMIT);
    clipboard.remote_grab(vec![Format::Text, Format::Html, Format::Png]);

    let targets = wait_for("our TARGETS", WAIT, || {
        let out =
            x.command("xclip").args(["-o", "-selection", "clipboard", "-t", "TARGETS"]).output().ok()?;
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        listed.contains("image/png").then_some(listed)
    })
    .unwrap();
    let targets: Vec<&str> = targets.lines().collect();
    for atom in [
        "TARGETS",
        "TIMESTAMP",
        "UTF8_STRING",
        "text/plain;charset=utf-8",
        "STRING",
        "text/html",
        "image/png",
    ] {
        assert!(targets.contains(&atom), "{atom} missing from {targets:?}");
    }
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty), "TARGETS needs no remote data");

    // Two pastes of text at once: one request.
    let first = Paste::start(&x, "UTF8_STRING");
    let LocalEvent::DataWanted { request, format: Format::Text } = next(&events, "the paste's request")
    else {
        panic!("expected DataWanted for text")
    };
    let second = Paste::start(&x, "text/plain;charset=utf-8");
    let text = "remote héllo ✓\n".as_bytes().to_vec();
    // Wait until the second paste is registered or served: it must not make a request either
    // way (it joins the first's, or is served from the cache).
    clipboard.provide(request, Some(text.clone()));
    for paste in [first, second] {
        let (status, out) = paste.finish();
        assert!(status.success(), "{status}");
        assert_eq!(out, text);
    }
    // Cached: a third paste asks nothing remotely.
    let (status, out) = Paste::start(&x, "UTF8_STRING").finish();
    assert!(status.success());
    assert_eq!(out, text);
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty), "pastes of answered content make no request");

    // 5 MiB of PNG: INCR to the requestor.
    let image = png(1024, 1280);
    assert!(image.len() > 5 * 1024 * 1024);
    let paste = Paste::start(&x, "image/png");
    let LocalEvent::DataWanted { request, format: Format::Png } = next(&events, "the PNG paste's request")
    else {
        panic!("expected DataWanted for PNG")
    };
    clipboard.provide(request, Some(image.clone()));
    let (status, out) = paste.finish();
    assert!(status.success());
    assert!(out == image, "{} bytes pasted, {} provided", out.len(), image.len());

    // Refused: the paste fails, nothing hangs.
    let paste = Paste::start(&x, "text/html");
    let LocalEvent::DataWanted { request, format: Format::Html } = next(&events, "the HTML paste's request")
    else {
        panic!("expected DataWanted for HTML")
    };
    clipboard.provide(request, None);
    let (status, out) = paste.finish();
    assert!(!status.success(), "a refused paste fails (printed {} bytes)", out.len());

    // A target we do not offer is refused without asking.
    let (status, _) = Paste::start(&x, "application/x-unknown").finish();
    assert!(!status.success());
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn our_own_grab_is_not_reported_and_a_local_copy_takes_over() {
    let Some(x) = display("our_own_grab_is_not_reported_and_a_local_copy_takes_over") else { return };
    let (clipboard, events) = connect(&x, LIMIT);
    let mut first = Copier::start(&x, "UTF8_STRING", b"one");
    assert_eq!(next(&events, "the first copy"), LocalEvent::Grabbed(vec![Format::Text]));

    clipboard.remote_grab(vec![Format::Html]);
    // xclip exits when it loses the selection: we took it.
    wait_for("xclip to lose the selection", WAIT, || first.exited()).unwrap();
    // While we own it, there is nothing local to fetch.
    assert_eq!(fetch(&clipboard, &events, 1, Format::Html), Err(ClipboardError::Unavailable(Format::Html)));

    // A local copy takes it back: the next event is its grab (none came for ours).
    let mut second = Copier::start(&x, "UTF8_STRING", b"two");
    assert_eq!(next(&events, "the second copy"), LocalEvent::Grabbed(vec![Format::Text]));
    assert_eq!(fetch(&clipboard, &events, 2, Format::Text), Ok(b"two".to_vec()));
    // Pasting locally now reaches xclip, not us.
    let (status, out) = Paste::start(&x, "UTF8_STRING").finish();
    assert!(status.success());
    assert_eq!(out, b"two");

    // The owner goes away: released.
    let _ = second.0.kill();
    assert_eq!(next(&events, "the owner's exit"), LocalEvent::Released);
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn two_peers_on_one_display_pass_large_content_both_ways() {
    let Some(x) = display("two_peers_on_one_display_pass_large_content_both_ways") else { return };
    let (owner, owner_events) = connect(&x, LIMIT);
    let (reader, reader_events) = connect(&x, LIMIT);
    owner.remote_grab(vec![Format::Html, Format::Text]);
    // To the reader, the owner is a local application like any other.
    assert_eq!(
        next(&reader_events, "the owner's grab"),
        LocalEvent::Grabbed(vec![Format::Text, Format::Html])
    );

    let html = format!("<p>{}</p>", String::from_utf8(text(3 * 1024 * 1024)).unwrap()).into_bytes();
    reader.fetch(1, Format::Html);
    let LocalEvent::DataWanted { request, format: Format::Html } =
        next(&owner_events, "the reader's request")
    else {
        panic!("expected DataWanted for HTML")
    };
    owner.provide(request, Some(html.clone()));
    match next(&reader_events, "the fetched HTML") {
        LocalEvent::Fetched { id: 1, result: Ok(bytes) } => assert!(bytes == html, "{} bytes", bytes.len()),
        other => panic!("unexpected {other:?}"),
    }

    // The owner goes away: its selection with it.
    drop(owner);
    assert_eq!(next(&reader_events, "the owner's exit"), LocalEvent::Released);
}

/// A local owner that answers wrongly on purpose: text as 32-bit data, a PNG as an endless
/// INCR transfer, HTML never. Runs until the X server goes away.
fn hostile_owner(display: &str) {
    use x11rb::connection::Connection;
    use x11rb::protocol::Event;
    use x11rb::protocol::xproto::{
        AtomEnum, ChangeWindowAttributesAux, ConnectionExt as _, CreateWindowAux, EventMask, PropMode,
        Property, SELECTION_NOTIFY_EVENT, SelectionNotifyEvent, WindowClass,
    };
    use x11rb::wrapper::ConnectionExt as _;

    let (conn, screen) = x11rb::connect(Some(display)).expect("the hostile owner connects");
    let intern = |name: &str| conn.intern_atom(false, name.as_bytes()).unwrap().reply().unwrap().atom;
    let [clipboard, targets, utf8, png, html, incr] =
        ["CLIPBOARD", "TARGETS", "UTF8_STRING", "image/png", "text/html", "INCR"].map(intern);
    let window = conn.generate_id().unwrap();
    let root = conn.setup().roots[screen].root;
    conn.create_window(0, window, root, 0, 0, 1, 1, 0, WindowClass::INPUT_ONLY, 0, &CreateWindowAux::new())
        .unwrap();
    conn.set_selection_owner(window, clipboard, x11rb::CURRENT_TIME).unwrap();
    conn.flush().unwrap();
    let mut endless = Vec::new();
    while let Ok(event) = conn.wait_for_event() {
        match event {
            Event::SelectionRequest(e) => {
                let mut answer = SelectionNotifyEvent {
                    response_type: SELECTION_NOTIFY_EVENT,
                    sequence: 0,
                    time: e.time,
                    requestor: e.requestor,
                    selection: e.selection,
                    target: e.target,
                    property: e.property,
                };
                if e.target == targets {
                    let list = [targets, utf8, png, html];
                    conn.change_property32(PropMode::REPLACE, e.requestor, e.property, AtomEnum::ATOM, &list)
                        .unwrap();
                } else if e.target == utf8 {
                    conn.change_property32(PropMode::REPLACE, e.requestor, e.property, utf8, &[1, 2, 3])
                        .unwrap();
                } else if e.target == png {
                    let watch = ChangeWindowAttributesAux::new().event_mask(EventMask::PROPERTY_CHANGE);
                    conn.change_window_attributes(e.requestor, &watch).unwrap();
                    conn.change_property32(PropMode::REPLACE, e.requestor, e.property, incr, &[0]).unwrap();
                    endless.push((e.requestor, e.property));
                } else if e.target == html {
                    continue;
                } else {
                    answer.property = x11rb::NONE;
                }
                conn.send_event(false, e.requestor, EventMask::NO_EVENT, answer).unwrap();
            }
            Event::PropertyNotify(e)
                if e.state == Property::DELETE && endless.contains(&(e.window, e.atom)) =>
            {
                let chunk = vec![0x89u8; 64 * 1024];
                conn.change_property8(PropMode::REPLACE, e.window, e.atom, png, &chunk).unwrap();
            }
            _ => {}
        }
        if conn.flush().is_err() {
            return;
        }
    }
}

#[test]
fn a_hostile_local_owner_gets_errors_not_hangs() {
    let Some(x) = display("a_hostile_local_owner_gets_errors_not_hangs") else { return };
    let (clipboard, events) = connect(&x, 1024 * 1024);
    let name = x.display().to_owned();
    std::thread::spawn(move || hostile_owner(&name));
    assert_eq!(
        next(&events, "the hostile grab"),
        LocalEvent::Grabbed(vec![Format::Text, Format::Html, Format::Png])
    );
    assert_eq!(fetch(&clipboard, &events, 1, Format::Text), Err(ClipboardError::Malformed("not 8-bit data")));
    assert_eq!(
        fetch(&clipboard, &events, 2, Format::Png),
        Err(ClipboardError::TooLarge { limit: 1024 * 1024 })
    );
    // Never answered: the fetch times out (FETCH_TIMEOUT), the next one still runs.
    clipboard.fetch(3, Format::Html);
    clipboard.fetch(4, Format::Text);
    assert_eq!(
        next(&events, "the unanswered fetch"),
        LocalEvent::Fetched { id: 3, result: Err(ClipboardError::Timeout) }
    );
    assert_eq!(
        next(&events, "the fetch after it"),
        LocalEvent::Fetched { id: 4, result: Err(ClipboardError::Malformed("not 8-bit data")) }
    );
}
