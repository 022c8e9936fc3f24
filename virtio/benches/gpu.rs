//! The display path benchmark: `cargo bench -p pleiades-virtio --bench gpu`.
//!
//! For each update (a full 1920x1080 frame, one line of console text across the screen, one
//! glyph) it measures, as medians over many flushes:
//! - **flush**: RESOURCE_FLUSH handled by the device (request parsed, rectangle checked, the
//!   damaged pixels copied into the display sink, consumers woken);
//! - **flush → consumer**: from the flush request until a consumer thread blocked in
//!   [`DisplaySink::wait_change`] has taken the damage into its own framebuffer;
//! - **bytes copied** per flush into the sink and out to the consumer;
//!
//! each next to a plain `copy_from_slice` of the same number of bytes measured in the same run
//! (the ratio is what means something on a noisy machine). Small updates are timed in batches
//! (each sample is a batch of calls that moves about 256 KiB, divided by the calls) so that the
//! clock's own cost does not make up the figure; the memcpy reference is timed the same way.
//! The guest's TRANSFER_TO_HOST_2D
//! (guest pages → resource) is measured separately: it is the driver's copy, made before the
//! flush. `PLEIADES_BENCH_FLUSHES` (default 300) sets the flushes per row.

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pleiades_virtio::GuestMemory;
use pleiades_virtio::gpu::protocol::{Rect, encode};
use pleiades_virtio::gpu::{DisplaySink, Framebuffer, Gpu, GpuConfig};
use vm_memory::{Bytes, GuestAddress};

const WIDTH: u32 = 1920;
const HEIGHT: u32 = 1080;
const BACKING: u64 = 0x10_0000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A device showing a 1920x1080 resource whose backing holds a pattern.
fn setup() -> (Gpu, GuestMemory) {
    let bytes = u64::from(WIDTH * HEIGHT * 4);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (BACKING + bytes + 0x10_0000) as usize)]).unwrap();
    let pattern: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(BACKING)).unwrap();
    let mut gpu = Gpu::new(&GpuConfig { width: WIDTH, height: HEIGHT, ..GpuConfig::default() }).unwrap();
    let full = Rect::new(0, 0, WIDTH, HEIGHT);
    // Backing in 4 KiB pages, as the Linux driver attaches a shmem object.
    let pages: Vec<(u64, u32)> = (0..bytes.div_ceil(4096)).map(|p| (BACKING + p * 4096, 4096)).collect();
    for request in [
        encode::create_2d(1, 2, WIDTH, HEIGHT),
        encode::attach(1, &pages),
        encode::transfer(1, full, 0),
        encode::set_scanout(0, 1, full),
    ] {
        let response = gpu.control_request(&request, &mem);
        assert_eq!(&response[0..4], &0x1100u32.to_le_bytes(), "setup request refused");
    }
    (gpu, mem)
}

struct Row {
    name: &'static str,
    rect: Rect,
}

/// Calls per timed sample for an update of `bytes`: about 256 KiB a sample, 1 to 1000 calls.
fn batch_for(bytes: usize) -> usize {
    (256 * 1024 / bytes.max(1)).clamp(1, 1000)
}

/// The median over `samples` of the time per call of `f`, each sample timing a batch of `batch`.
fn per_call_us(samples: usize, batch: usize, mut f: impl FnMut()) -> f64 {
    let v = (0..samples)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            us(t.elapsed()) / batch as f64
        })
        .collect();
    median(v)
}

fn memcpy_us(bytes: usize, runs: usize) -> f64 {
    let src = vec![7u8; bytes];
    let mut dst = vec![0u8; bytes];
    per_call_us(runs, batch_for(bytes), || {
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
    })
}

/// A consumer that waits on the sink and takes the damage, reporting when it has it.
fn consumer(sink: DisplaySink, done: mpsc::Sender<Instant>, stop: mpsc::Receiver<()>) {
    let mut fb = Framebuffer::default();
    sink.take_damage(0, &mut fb);
    let mut seen = sink.generation();
    loop {
        if stop.try_recv().is_ok() {
            return;
        }
        let now = sink.wait_change(seen, Duration::from_millis(100));
        if now == seen {
            continue;
        }
        seen = now;
        if sink.take_damage(0, &mut fb).is_some_and(|d| !d.is_empty()) && done.send(Instant::now()).is_err() {
            return;
        }
    }
}

fn main() {
    let flushes =
        std::env::var("PLEIADES_BENCH_FLUSHES").ok().and_then(|v| v.parse().ok()).unwrap_or(300usize);
    let (mut gpu, mem) = setup();
    let sink = gpu.handle().sink().clone();
    let rows = [
        Row { name: "full frame 1920x1080", rect: Rect::new(0, 0, WIDTH, HEIGHT) },
        Row { name: "text line 1920x16", rect: Rect::new(0, 512, WIDTH, 16) },
        Row { name: "glyph 8x16", rect: Rect::new(800, 512, 8, 16) },
    ];

    println!("virtio-gpu display path, {flushes} flushes per row (medians; µs)");
    println!(
        "  {:<22} {:>9} {:>9} {:>9} {:>12} {:>12} {:>12} {:>10}",
        "update", "bytes", "memcpy", "flush", "flush/memcpy", "→consumer", "→cons/memcpy", "transfer"
    );
    for row in &rows {
        let bytes = (row.rect.area() * 4) as usize;
        let reference = memcpy_us(bytes, flushes);
        let flush = encode::flush(1, row.rect);
        let transfer = encode::transfer(
            1,
            row.rect,
            u64::from(row.rect.y) * u64::from(WIDTH) * 4 + u64::from(row.rect.x) * 4,
        );

        // The device alone (no consumer waiting).
        let batch = batch_for(bytes);
        let before_in = sink.metrics().bytes_in.load(Ordering::Relaxed);
        let flush_us = per_call_us(flushes, batch, || {
            black_box(gpu.control_request(&flush, &mem));
        });
        let bytes_in =
            (sink.metrics().bytes_in.load(Ordering::Relaxed) - before_in) / (flushes * batch) as u64;
        let transfer_us = per_call_us(flushes.min(100), batch, || {
            black_box(gpu.control_request(&transfer, &mem));
        });

        // Flush → a waiting consumer has the damage.
        let (done_tx, done_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel();
        let consumer_sink = sink.clone();
        let thread = std::thread::spawn(move || consumer(consumer_sink, done_tx, stop_rx));
        std::thread::sleep(Duration::from_millis(20));
        let mut latency = Vec::with_capacity(flushes);
        for _ in 0..flushes {
            let t = Instant::now();
            gpu.control_request(&flush, &mem);
            if let Ok(got) = done_rx.recv_timeout(Duration::from_secs(5)) {
                latency.push(us(got.duration_since(t)));
            }
            // Let the consumer go back to waiting, as between real frames.
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = stop_tx.send(());
        let _ = thread.join();

        let consumer_us = median(latency);
        println!(
            "  {:<22} {:>9} {:>9.3} {:>9.3} {:>11.2}x {:>12.2} {:>11.2}x {:>10.3}",
            row.name,
            bytes_in,
            reference,
            flush_us,
            flush_us / reference,
            consumer_us,
            consumer_us / reference,
            transfer_us,
        );
    }
    println!(
        "  bytes: copied into the sink per flush (the consumer copies the same out); transfer: TRANSFER_TO_HOST_2D of the same rectangle from 4 KiB guest pages"
    );
}
