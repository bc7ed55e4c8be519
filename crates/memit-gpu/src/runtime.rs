//! The GPU runtime's cost model, in one place: a pool of reusable buffers,
//! the command recorder (many dispatches per compute pass, per-dispatch
//! parameters in one uniform ring written once per submit) and the cost
//! counters every phase reports. Ops never create wgpu buffers themselves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Machine-independent costs of GPU work: what the host asked the GPU to
/// do, not how long it took, so they are identical on every adapter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CostCounters {
    /// Kernel launches.
    pub dispatches: u64,
    /// Command buffers handed to the queue.
    pub submits: u64,
    /// Times the host blocked until the GPU finished (readbacks and syncs).
    pub host_waits: u64,
    /// Bytes written from the host: tensors, indices and kernel parameters.
    pub bytes_to_device: u64,
    /// Bytes read back to the host.
    pub bytes_from_device: u64,
    /// wgpu buffers created (pooled buffers reused are not counted).
    pub buffers_created: u64,
}

impl CostCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &CostCounters) -> CostCounters {
        CostCounters {
            dispatches: self.dispatches - earlier.dispatches,
            submits: self.submits - earlier.submits,
            host_waits: self.host_waits - earlier.host_waits,
            bytes_to_device: self.bytes_to_device - earlier.bytes_to_device,
            bytes_from_device: self.bytes_from_device - earlier.bytes_from_device,
            buffers_created: self.buffers_created - earlier.buffers_created,
        }
    }

    /// Field-wise sum, for phases measured in several pieces.
    pub fn add(&mut self, other: &CostCounters) {
        self.dispatches += other.dispatches;
        self.submits += other.submits;
        self.host_waits += other.host_waits;
        self.bytes_to_device += other.bytes_to_device;
        self.bytes_from_device += other.bytes_from_device;
        self.buffers_created += other.buffers_created;
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub dispatches: AtomicU64,
    pub submits: AtomicU64,
    pub host_waits: AtomicU64,
    pub bytes_to_device: AtomicU64,
    pub bytes_from_device: AtomicU64,
    pub buffers_created: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CostCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CostCounters {
            dispatches: get(&self.dispatches),
            submits: get(&self.submits),
            host_waits: get(&self.host_waits),
            bytes_to_device: get(&self.bytes_to_device),
            bytes_from_device: get(&self.bytes_from_device),
            buffers_created: get(&self.buffers_created),
        }
    }
}

/// Rounds a request up to its pool size class: powers of two split into
/// four steps (so at most 25% is wasted), at least 256 bytes, never above
/// `cap` (the largest buffer one binding may cover) unless the request is.
pub(crate) fn size_class(bytes: u64, cap: u64) -> u64 {
    let bytes = bytes.max(4).next_multiple_of(4);
    if bytes <= 256 {
        return 256.min(cap.max(bytes));
    }
    let top = 63 - (bytes - 1).leading_zeros(); // 2^top < bytes <= 2^(top+1)
    let quarter = 1u64 << (top - 2);
    let class = (bytes.div_ceil(quarter) * quarter).next_multiple_of(4);
    class.min(cap.max(bytes) & !3).max(bytes)
}

struct Idle {
    buffer: wgpu::Buffer,
    /// Submits done when it was released: commands recorded before its
    /// release are all submitted once the submit count has moved past this.
    released_at: u64,
}

/// Buffers no longer used by any tensor, by (size, usage), kept for reuse.
#[derive(Default)]
pub(crate) struct BufferPool {
    idle: HashMap<(u64, u32), Vec<Idle>>,
    idle_bytes: u64,
    /// Release order, to drop the oldest when over the cap.
    order: u64,
}

impl BufferPool {
    /// An idle buffer of exactly this size and usage, preferring one whose
    /// users are all submitted (`cold`) when `want_cold`. Returns whether
    /// the one returned is cold.
    pub fn take(&mut self, size: u64, usage: wgpu::BufferUsages, submits_done: u64, want_cold: bool) -> Option<(wgpu::Buffer, bool)> {
        let list = self.idle.get_mut(&(size, usage.bits()))?;
        let pick = if want_cold { list.iter().position(|b| b.released_at < submits_done).unwrap_or(list.len() - 1) } else { list.len() - 1 };
        let idle = list.swap_remove(pick);
        if list.is_empty() {
            self.idle.remove(&(size, usage.bits()));
        }
        self.idle_bytes -= size;
        let cold = idle.released_at < submits_done;
        Some((idle.buffer, cold))
    }

    /// Keeps `buffer` for reuse, then drops the least recently released
    /// buffers while more than `cap` bytes are idle.
    pub fn give(&mut self, buffer: wgpu::Buffer, usage: wgpu::BufferUsages, submits_done: u64, cap: u64) {
        let size = buffer.size();
        self.order += 1;
        self.idle_bytes += size;
        self.idle.entry((size, usage.bits())).or_default().push(Idle { buffer, released_at: submits_done });
        while self.idle_bytes > cap {
            // Largest first: a few big buffers free the most with the least churn.
            let Some(&key) = self.idle.keys().max_by_key(|(size, _)| *size) else { break };
            let list = self.idle.get_mut(&key).expect("key exists");
            let dropped = list.remove(0);
            self.idle_bytes -= dropped.buffer.size();
            if list.is_empty() {
                self.idle.remove(&key);
            }
        }
    }

    pub fn idle_bytes(&self) -> u64 {
        self.idle_bytes
    }

    pub fn clear(&mut self) {
        self.idle.clear();
        self.idle_bytes = 0;
    }
}

/// Bytes reserved per dispatch in the uniform ring: the largest parameter
/// block of any kernel, rounded to the offset alignment every adapter
/// accepts.
pub(crate) const PARAMS_SLOT: u64 = 256;

/// What one dispatch computes, for the profile's rates: a matrix product's
/// shape and its floating-point operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Work {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub batch: u32,
    pub flops: u64,
}

impl Work {
    /// A batch of `m`×`k` by `k`×`n` products (one multiply-add is 2 flops).
    pub fn matmul(m: usize, n: usize, k: usize, batch: usize) -> Work {
        Work { m: m as u32, n: n as u32, k: k as u32, batch: batch as u32, flops: 2 * (m * n * k * batch) as u64 }
    }
}

/// The GPU time of one dispatch, from timestamps written before and after
/// it (its own compute pass).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelTiming {
    /// `family::entry`.
    pub kernel: String,
    pub work: Option<Work>,
    pub nanos: f64,
}

/// Timestamp queries around every dispatch while profiling is on: each
/// dispatch gets its own pass, the submit resolves the timestamps and the
/// host reads them right away. This costs a wait per submit, so it is for
/// measuring, never for normal runs.
pub(crate) struct Profiler {
    pub query_set: wgpu::QuerySet,
    /// QUERY_RESOLVE target, then copied into `readback` for mapping.
    pub resolve: wgpu::Buffer,
    pub readback: wgpu::Buffer,
    /// Nanoseconds per timestamp tick (timestamps are read on native only).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub period: f64,
    /// Dispatches recorded since the last submit, in query order.
    pub pending: Vec<(String, Option<Work>)>,
    pub timings: Vec<KernelTiming>,
    /// The first failure to read timestamps back, if any.
    pub failure: Option<String>,
}

/// Work recorded but not yet submitted.
pub(crate) struct Recorder {
    pub encoder: Option<wgpu::CommandEncoder>,
    /// The open compute pass; ended before copies and at submit.
    pub pass: Option<wgpu::ComputePass<'static>>,
    pub dispatches: usize,
    /// Parameters of the recorded dispatches, slot by slot, written to the
    /// uniform ring just before the submit.
    pub params: Vec<u8>,
    pub profiler: Option<Profiler>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder { encoder: None, pass: None, dispatches: 0, params: Vec::new(), profiler: None }
    }

    pub fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder.get_or_insert_with(|| device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("memit") }))
    }

    /// The open compute pass, or a new one. While profiling, every
    /// dispatch gets a new pass whose start and end write timestamps.
    pub fn pass(&mut self, device: &wgpu::Device) -> &mut wgpu::ComputePass<'static> {
        if self.profiler.is_some() {
            self.pass = None;
        }
        if self.pass.is_none() {
            let index = self.profiler.as_ref().map(|p| 2 * p.pending.len() as u32);
            let profiler = self.profiler.take();
            let encoder = self.encoder(device);
            let timestamp_writes = profiler.as_ref().zip(index).map(|(p, i)| wgpu::ComputePassTimestampWrites {
                query_set: &p.query_set,
                beginning_of_pass_write_index: Some(i),
                end_of_pass_write_index: Some(i + 1),
            });
            let pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes }).forget_lifetime();
            self.profiler = profiler;
            self.pass = Some(pass);
        }
        self.pass.as_mut().expect("just opened")
    }

    pub fn is_empty(&self) -> bool {
        self.encoder.is_none()
    }
}

/// Bytes held by live tensors, for memory reports: `live` now, `peak` since
/// the last `GpuContext::reset_peak_memory`.
#[derive(Debug, Default)]
pub(crate) struct MemoryMeter {
    live: AtomicU64,
    peak: AtomicU64,
}

impl MemoryMeter {
    pub fn add(&self, bytes: u64) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    pub fn sub(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn usage(&self) -> MemoryUsage {
        MemoryUsage { live_bytes: self.live.load(Ordering::Relaxed), peak_bytes: self.peak.load(Ordering::Relaxed), pooled_bytes: 0 }
    }

    pub fn reset_peak(&self) {
        self.peak.store(self.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// GPU memory held by tensors (buffers are counted from allocation until
/// the last tensor using them is dropped), and by the pool for reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    pub live_bytes: u64,
    pub peak_bytes: u64,
    /// Released buffers kept for reuse (not counted in `live_bytes`).
    pub pooled_bytes: u64,
}

/// The pool, recorder, meter and counters of one device.
pub(crate) struct Runtime {
    pub pool: Mutex<BufferPool>,
    pub recorder: Mutex<Recorder>,
    pub counters: Counters,
    pub meter: MemoryMeter,
    /// Most idle bytes the pool keeps.
    pub pool_cap: u64,
}

impl Runtime {
    pub fn new(pool_cap: u64) -> Runtime {
        Runtime { pool: Mutex::default(), recorder: Mutex::new(Recorder::new()), counters: Counters::default(), meter: MemoryMeter::default(), pool_cap }
    }

    pub fn submits_done(&self) -> u64 {
        self.counters.submits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_waste_at_most_a_quarter_and_respect_the_cap() {
        for bytes in [1u64, 4, 255, 256, 257, 1000, 4096, 4097, 5000, 123_457, 1 << 20, (1 << 20) + 4, 3 << 29] {
            let class = size_class(bytes, u64::MAX);
            assert!(class >= bytes && class % 4 == 0, "{bytes} -> {class}");
            assert!(class <= 256 || (class as f64) <= bytes as f64 * 1.25 + 4.0, "{bytes} -> {class}");
        }
        assert_eq!(size_class(5000, 4096 + 1024), 5120);
        assert_eq!(size_class(5000, 5004), 5004);
        assert_eq!(size_class(4097, 4100), 4100);
        assert_eq!(size_class(4000, 4000), 4000);
        assert_eq!(size_class(100, 200), 200);
    }
}
