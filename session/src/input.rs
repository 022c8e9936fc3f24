//! The client's input, as virtio-input events for the VM's keyboard and tablet.
//!
//! Keys are evdev codes already (the client maps physical keys), so a key message is one
//! event and a `SYN_REPORT`. Pointer positions are in scanout pixels: the tablet spans the
//! monitors side by side (the layout the GPU offers, left to right), so a position becomes
//! tablet units of that whole area. Buttons arrive as the full pressed set; presses and
//! releases are derived from the change, so none is lost or doubled. The router remembers what
//! is pressed, so `ReleaseAll` (focus lost) and the end of a connection never leave a key stuck.
//!
//! A client can send at most [`RATE`] events per second (bursts of [`BURST`]); beyond that
//! events are dropped and counted, so a flood cannot starve the VM's input queue. Releases of
//! keys and buttons that are down are never dropped: no key stays held because a burst was cut.

use std::collections::BTreeSet;

use pleiades_protocol::wire::{InputMessage, buttons};

use pleiades_control::InputDevice;
use pleiades_virtio::input::InputEvent;
use pleiades_virtio::input::event::{
    ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_REL, KEY_MAX_KEYBOARD, REL_WHEEL, REL_X, REL_Y,
    TABLET_MAX,
};

/// Sustained input events per second a connection may send.
pub const RATE: f64 = 2000.0;
/// Events a connection may send at once.
pub const BURST: f64 = 500.0;
/// The largest relative step passed on (device units per message; more is clamped).
const MAX_REL: i32 = 4096;

/// Translates one connection's input.
#[derive(Debug)]
pub struct InputRouter {
    pressed_keys: BTreeSet<u16>,
    buttons: u32,
    tokens: f64,
    last_us: u64,
    /// Wheel motion below a whole notch (1/120 units), carried to the next `Wheel`.
    wheel_rest: i32,
    /// Messages dropped by the rate limit or refused (bad key codes).
    pub dropped: u64,
}

impl Default for InputRouter {
    fn default() -> Self {
        Self {
            pressed_keys: BTreeSet::new(),
            buttons: 0,
            tokens: BURST,
            last_us: 0,
            wheel_rest: 0,
            dropped: 0,
        }
    }
}

/// Events for one device, a whole report.
pub type Report = (InputDevice, Vec<InputEvent>);

impl InputRouter {
    /// Translates a message; `monitors` are the scanouts' sizes left to right (disabled ones
    /// `None`), `now_us` the monotonic time for the rate limit.
    pub fn route(
        &mut self,
        message: &InputMessage,
        monitors: &[Option<(u32, u32)>],
        now_us: u64,
    ) -> Vec<Report> {
        self.tokens = (self.tokens + (now_us.saturating_sub(self.last_us)) as f64 * RATE / 1e6).min(BURST);
        self.last_us = now_us;
        // Releases of what is down always pass: dropping one leaves a key (Shift) held in the
        // guest, and they are bounded by the presses that passed.
        let releases_only = match *message {
            InputMessage::ReleaseAll => true,
            InputMessage::Key(key) => !key.down && self.pressed_keys.contains(&key.code),
            InputMessage::Buttons(mask) => mask & !self.buttons == 0,
            _ => false,
        };
        if !releases_only {
            if self.tokens < 1.0 {
                self.dropped += 1;
                return Vec::new();
            }
            self.tokens -= 1.0;
        }
        match *message {
            InputMessage::Key(key) => {
                if key.code == 0 || key.code > KEY_MAX_KEYBOARD {
                    self.dropped += 1;
                    return Vec::new();
                }
                let changed = if key.down {
                    self.pressed_keys.insert(key.code)
                } else {
                    self.pressed_keys.remove(&key.code)
                };
                // A release of a key that is not down is dropped (the guest would see a stray
                // release); a repeated press is passed on (the client's auto-repeat).
                if !changed && !key.down {
                    return Vec::new();
                }
                vec![(InputDevice::Keyboard, vec![InputEvent::key(key.code, key.down), InputEvent::syn()])]
            }
            InputMessage::PointerAbs(p) => match tablet_position(p.scanout, p.x, p.y, monitors) {
                Some((x, y)) => vec![(
                    InputDevice::Tablet,
                    vec![
                        InputEvent::new(EV_ABS, ABS_X, x),
                        InputEvent::new(EV_ABS, ABS_Y, y),
                        InputEvent::syn(),
                    ],
                )],
                None => {
                    self.dropped += 1;
                    Vec::new()
                }
            },
            InputMessage::Buttons(mask) => self.set_buttons(mask).into_iter().collect(),
            InputMessage::Wheel(w) => {
                // The wire counts 1/120 of a detent (docs/protocol.md); the tablet's REL_WHEEL
                // whole detents: the rest waits for the next message (a touchpad's small steps).
                let total = self.wheel_rest.saturating_add(w.dy.clamp(-120 * 100, 120 * 100));
                let notches = total / 120;
                self.wheel_rest = total % 120;
                if notches == 0 {
                    return Vec::new();
                }
                // The wire value is the two's complement of the signed evdev value.
                vec![(
                    InputDevice::Tablet,
                    vec![InputEvent::new(EV_REL, REL_WHEEL, notches as u32), InputEvent::syn()],
                )]
            }
            InputMessage::PointerRel(p) => {
                if p.dx == 0 && p.dy == 0 {
                    return Vec::new();
                }
                let (dx, dy) = (p.dx.clamp(-MAX_REL, MAX_REL), p.dy.clamp(-MAX_REL, MAX_REL));
                vec![(
                    InputDevice::Mouse,
                    vec![
                        InputEvent::new(EV_REL, REL_X, dx as u32),
                        InputEvent::new(EV_REL, REL_Y, dy as u32),
                        InputEvent::syn(),
                    ],
                )]
            }
            InputMessage::ReleaseAll => self.release_all(),
        }
    }

    fn set_buttons(&mut self, mask: u32) -> Option<Report> {
        let mut events = Vec::new();
        for (bit, code) in
            [(buttons::LEFT, BTN_LEFT), (buttons::RIGHT, BTN_RIGHT), (buttons::MIDDLE, BTN_MIDDLE)]
        {
            let (was, is) = (self.buttons & bit != 0, mask & bit != 0);
            if was != is {
                events.push(InputEvent::key(code, is));
            }
        }
        self.buttons = mask & (buttons::LEFT | buttons::RIGHT | buttons::MIDDLE);
        if events.is_empty() {
            return None;
        }
        events.push(InputEvent::syn());
        Some((InputDevice::Tablet, events))
    }

    /// Releases everything pressed (focus lost, connection gone).
    pub fn release_all(&mut self) -> Vec<Report> {
        let mut reports = Vec::new();
        if !self.pressed_keys.is_empty() {
            let mut events: Vec<InputEvent> = std::mem::take(&mut self.pressed_keys)
                .into_iter()
                .map(|code| InputEvent::key(code, false))
                .collect();
            events.push(InputEvent::syn());
            reports.push((InputDevice::Keyboard, events));
        }
        reports.extend(self.set_buttons(0));
        reports
    }
}

/// Scanout pixels → tablet units over the monitors side by side.
fn tablet_position(scanout: u32, x: u32, y: u32, monitors: &[Option<(u32, u32)>]) -> Option<(u32, u32)> {
    let (w, h) = (*monitors.get(scanout as usize)?)?;
    if x >= w || y >= h {
        return None;
    }
    let offset: u32 = monitors[..scanout as usize].iter().flatten().map(|(w, _)| w).sum();
    let total_w: u32 = monitors.iter().flatten().map(|(w, _)| w).sum();
    let total_h: u32 = monitors.iter().flatten().map(|(_, h)| *h).max().unwrap_or(1);
    let scale =
        |v: u32, size: u32| (u64::from(v) * u64::from(TABLET_MAX) / u64::from(size.max(2) - 1)) as u32;
    Some((scale(offset + x, total_w).min(TABLET_MAX), scale(y, total_h).min(TABLET_MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleiades_protocol::wire::{Key, PointerAbs, PointerRel, Wheel};

    const ONE: &[Option<(u32, u32)>] = &[Some((1024, 768))];

    #[test]
    fn keys_buttons_and_wheel_become_reports_and_nothing_stays_pressed() {
        let mut r = InputRouter::default();
        let down = r.route(&InputMessage::Key(Key { code: 30, down: true }), ONE, 1);
        assert_eq!(down, vec![(InputDevice::Keyboard, vec![InputEvent::key(30, true), InputEvent::syn()])]);
        assert!(
            r.route(&InputMessage::Key(Key { code: 31, down: false }), ONE, 2).is_empty(),
            "stray release"
        );
        assert!(r.route(&InputMessage::Key(Key { code: 999, down: true }), ONE, 3).is_empty(), "bad code");
        let click = r.route(&InputMessage::Buttons(buttons::LEFT | buttons::MIDDLE), ONE, 4);
        assert_eq!(
            click[0].1,
            vec![InputEvent::key(BTN_LEFT, true), InputEvent::key(BTN_MIDDLE, true), InputEvent::syn()]
        );
        assert!(
            r.route(&InputMessage::Buttons(buttons::LEFT | buttons::MIDDLE), ONE, 5).is_empty(),
            "no change"
        );
        assert!(r.route(&InputMessage::Wheel(Wheel { dx: 0, dy: -60 }), ONE, 6).is_empty(), "half a detent");
        let wheel = r.route(&InputMessage::Wheel(Wheel { dx: 0, dy: -60 }), ONE, 6);
        assert_eq!(wheel[0].1[0], InputEvent::new(EV_REL, REL_WHEEL, u32::MAX), "one detent down");
        let moved = r.route(&InputMessage::PointerRel(PointerRel { dx: 5, dy: -3 }), ONE, 6);
        assert_eq!(
            moved,
            [(
                InputDevice::Mouse,
                vec![
                    InputEvent::new(EV_REL, REL_X, 5),
                    InputEvent::new(EV_REL, REL_Y, (-3i32) as u32),
                    InputEvent::syn()
                ]
            )]
        );
        let released = r.route(&InputMessage::ReleaseAll, ONE, 7);
        assert_eq!(released[0], (InputDevice::Keyboard, vec![InputEvent::key(30, false), InputEvent::syn()]));
        assert_eq!(
            released[1].1,
            vec![InputEvent::key(BTN_LEFT, false), InputEvent::key(BTN_MIDDLE, false), InputEvent::syn()]
        );
        assert!(r.release_all().is_empty());
    }

    #[test]
    fn pointer_positions_span_the_monitors_side_by_side() {
        let two = [Some((1000, 800)), Some((1000, 600))];
        let mut r = InputRouter::default();
        let at = |r: &mut InputRouter, s, x, y| {
            r.route(&InputMessage::PointerAbs(PointerAbs { scanout: s, x, y }), &two, 0)
        };
        let first = at(&mut r, 0, 0, 0);
        assert_eq!(first[0].1[..2], [InputEvent::new(EV_ABS, ABS_X, 0), InputEvent::new(EV_ABS, ABS_Y, 0)]);
        let right_edge = at(&mut r, 1, 999, 599);
        assert_eq!(right_edge[0].1[0], InputEvent::new(EV_ABS, ABS_X, TABLET_MAX));
        assert!(at(&mut r, 1, 1000, 0).is_empty(), "outside the monitor");
        assert!(at(&mut r, 5, 0, 0).is_empty(), "no such monitor");
        assert_eq!(r.dropped, 2);
    }

    #[test]
    fn a_flood_is_cut_to_the_rate() {
        let mut r = InputRouter::default();
        let sent = (0..10_000u64)
            .filter(|&i| !r.route(&InputMessage::Buttons((i % 2) as u32), ONE, 1_000_000 + i).is_empty())
            .count();
        // 10 ms of virtual time: the burst plus about RATE * 0.01 presses, each with its release.
        assert!(sent as f64 <= 2.0 * (BURST + RATE * 0.011 + 1.0), "{sent} events passed");
        assert!(r.dropped > 4000, "{} dropped", r.dropped);
        assert_eq!(r.buttons, 0, "a button left down");
    }

    #[test]
    fn a_cut_burst_leaves_no_key_down() {
        let mut r = InputRouter::default();
        let key = |code, down| InputMessage::Key(Key { code, down });
        // Shift down, then a burst of letters far beyond the limit at one instant, then Shift up.
        assert_eq!(r.route(&key(42, true), ONE, 1_000_000).len(), 1);
        for _ in 0..1000 {
            r.route(&key(30, true), ONE, 1_000_000);
            r.route(&key(30, false), ONE, 1_000_000);
        }
        assert!(r.dropped > 0, "the burst was not cut");
        let up = r.route(&key(42, false), ONE, 1_000_000);
        assert_eq!(up, [(InputDevice::Keyboard, vec![InputEvent::key(42, false), InputEvent::syn()])]);
        assert!(r.pressed_keys.is_empty(), "{:?} still down", r.pressed_keys);
    }
}
