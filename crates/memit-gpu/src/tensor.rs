//! Tensors over wgpu buffers. A tensor is row-major and split along its first
//! dimension into chunks, each its own buffer no larger than one storage
//! binding, so any operand (GPT-J's 1 GiB covariance included) can be bound.
//! Kernels see chunk-aligned "pieces" and take element offsets as parameters,
//! so views never need aligned binding offsets.

use std::ops::Range;
use std::sync::Arc;

use half::f16;

use crate::context::GpuContext;
use crate::error::{GpuError, Result};
pub use crate::runtime::MemoryUsage;
use crate::runtime::Runtime;

/// Element storage type. Arithmetic is always f32; f16 halves the memory of
/// weights and is read in shaders with `unpack2x16float`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
}

/// A buffer from the device's pool, returned to it when the last user
/// drops it. Tensor buffers are counted by the memory meter while alive.
#[derive(Debug)]
pub(crate) struct PooledBuffer {
    buffer: wgpu::Buffer,
    usage: wgpu::BufferUsages,
    metered_bytes: u64,
    runtime: Arc<Runtime>,
}

impl PooledBuffer {
    pub(crate) fn new(buffer: wgpu::Buffer, usage: wgpu::BufferUsages, metered_bytes: u64, runtime: Arc<Runtime>) -> PooledBuffer {
        runtime.meter.add(metered_bytes);
        PooledBuffer { buffer, usage, metered_bytes, runtime }
    }
}

impl std::ops::Deref for PooledBuffer {
    type Target = wgpu::Buffer;

    fn deref(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.runtime.meter.sub(self.metered_bytes);
        let submits = self.runtime.submits_done();
        self.runtime.pool.lock().unwrap().give(self.buffer.clone(), self.usage, submits, self.runtime.pool_cap);
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Runtime")
    }
}

/// A run of whole rows stored contiguously in one buffer.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    pub buffer: Arc<PooledBuffer>,
    /// Element offset of the segment's first row in `buffer`.
    pub offset: usize,
    pub rows: usize,
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    segments: Vec<Segment>,
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the first dimension, along which storage is chunked.
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Elements per first-dimension row.
    pub fn row_len(&self) -> usize {
        self.shape[1..].iter().product()
    }

    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Number of buffers the tensor spans.
    pub fn n_chunks(&self) -> usize {
        self.segments.len()
    }

    /// The shape as (rows, cols) for a 2-D tensor, or an error naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(GpuError::shape(op, format!("expected a 2-D tensor, got shape {:?}", self.shape))),
        }
    }

    /// Whether both tensors are views of the same storage from the same
    /// element (fused projections hand out q, k and v this way).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        self.segments.len() == other.segments.len()
            && self.segments.iter().zip(&other.segments).all(|(a, b)| Arc::ptr_eq(&a.buffer, &b.buffer) && a.offset == b.offset)
    }

    /// A view of rows `range` of the first dimension (no copy).
    pub fn slice_rows(&self, range: Range<usize>) -> Result<Tensor> {
        if range.start > range.end || range.end > self.rows() {
            return Err(GpuError::shape("slice_rows", format!("rows {range:?} out of 0..{}", self.rows())));
        }
        let row_len = self.row_len();
        let mut segments = Vec::new();
        let mut seg_start = 0;
        for seg in &self.segments {
            let seg_end = seg_start + seg.rows;
            let lo = range.start.max(seg_start);
            let hi = range.end.min(seg_end);
            if lo < hi {
                segments.push(Segment {
                    buffer: seg.buffer.clone(),
                    offset: seg.offset + (lo - seg_start) * row_len,
                    rows: hi - lo,
                });
            }
            seg_start = seg_end;
        }
        let mut shape = self.shape.clone();
        shape[0] = range.len();
        Ok(Tensor { shape, dtype: self.dtype, segments })
    }

    /// The same elements under another shape. Each chunk must hold whole rows
    /// of the new shape (always true for a single-chunk tensor).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if shape.is_empty() || numel != self.numel() {
            return Err(GpuError::shape("reshape", format!("{:?} -> {shape:?}", self.shape)));
        }
        let old_row = self.row_len();
        let new_row: usize = shape[1..].iter().product();
        let mut segments = Vec::with_capacity(self.segments.len());
        for seg in &self.segments {
            let elems = seg.rows * old_row;
            if new_row == 0 || elems % new_row != 0 {
                return Err(GpuError::shape(
                    "reshape",
                    format!("{:?} -> {shape:?} would split a row across storage chunks", self.shape),
                ));
            }
            segments.push(Segment { buffer: seg.buffer.clone(), offset: seg.offset, rows: elems / new_row });
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: self.dtype, segments })
    }
}

/// A row range that lies inside one chunk of every tensor it was cut from.
pub(crate) struct Piece {
    pub row0: usize,
    pub rows: usize,
    /// Per tensor: its buffer and the element offset of row `row0`.
    pub parts: Vec<(Arc<PooledBuffer>, usize)>,
}

/// Cuts `0..len` at every chunk boundary (along the first dimension) of any
/// of `tensors`, returning (start, length) spans.
pub(crate) fn chunk_spans(len: usize, tensors: &[&Tensor]) -> Vec<(usize, usize)> {
    let mut cuts: Vec<usize> = vec![0, len];
    for t in tensors {
        let mut at = 0;
        for seg in &t.segments {
            at += seg.rows;
            cuts.push(at);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).filter(|w| w[1] <= len).map(|w| (w[0], w[1] - w[0])).collect()
}

/// Cuts the common row range of `tensors` (same number of rows) at every
/// chunk boundary of any of them.
pub(crate) fn row_pieces(tensors: &[&Tensor]) -> Vec<Piece> {
    chunk_spans(tensors[0].rows(), tensors)
        .into_iter()
        .map(|(row0, rows)| Piece { row0, rows, parts: tensors.iter().map(|t| t.locate(row0)).collect() })
        .collect()
}

impl Tensor {
    /// Buffer and element offset of the start of row `row`.
    pub(crate) fn locate(&self, row: usize) -> (Arc<PooledBuffer>, usize) {
        match self.segment_of(row) {
            Some((seg, within)) => (seg.buffer.clone(), seg.offset + within * self.row_len()),
            None => {
                let last = self.segments.last().expect("tensor without storage");
                (last.buffer.clone(), last.offset + last.rows * self.row_len())
            }
        }
    }

    /// Rows from `row` to the end of the segment holding it.
    fn rows_left_in_segment(&self, row: usize) -> usize {
        self.segment_of(row).map_or(0, |(seg, within)| seg.rows - within)
    }

    /// The segment holding row `row` and the row's index within it.
    fn segment_of(&self, row: usize) -> Option<(&Segment, usize)> {
        let mut start = 0;
        for seg in &self.segments {
            if row < start + seg.rows {
                return Some((seg, row - start));
            }
            start += seg.rows;
        }
        None
    }

    /// The single buffer a small tensor lives in, or an error naming `op`.
    pub(crate) fn single(&self, op: &'static str) -> Result<(&wgpu::Buffer, usize)> {
        match &self.segments[..] {
            [seg] => Ok((&seg.buffer, seg.offset)),
            _ => Err(GpuError::shape(op, format!("operand of shape {:?} spans {} chunks; it must fit one binding", self.shape, self.segments.len()))),
        }
    }
}

/// Little-endian bytes of `values` in `dtype`, padded to whole 4-byte words
/// (a trailing odd f16 gets a zero neighbour; `write` only pads at the end
/// of a segment, where the word is the tensor's own).
fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => {
            let mut halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            if halves.len() % 2 == 1 {
                halves.push(f16::ZERO);
            }
            bytemuck::cast_slice(&halves).to_vec()
        }
    }
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl GpuContext {
    /// Rows per chunk for rows of `row_bytes` bytes.
    fn rows_per_chunk(&self, row_bytes: u64) -> Result<usize> {
        if row_bytes > self.chunk_bytes() {
            return Err(GpuError::RowTooLarge { row_bytes, max_binding: self.chunk_bytes() });
        }
        Ok((self.chunk_bytes() / row_bytes.max(1)) as usize)
    }

    /// A zero-filled tensor (new buffers come zeroed; reused ones are
    /// cleared by a fill dispatch recorded in order with other work).
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.tensor(shape, dtype, Fill::Zero)
    }

    /// A tensor whose contents are unspecified, for outputs a kernel
    /// overwrites whole.
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.tensor(shape, dtype, Fill::Any)
    }

    /// A zero-filled f32 tensor whose storage chunks hold a multiple of
    /// `row_multiple` rows each, so blocks of that many rows never straddle
    /// two buffers (blocked factorisations work on such blocks in place).
    pub fn zeros_in_row_blocks(&self, shape: &[usize], row_multiple: usize) -> Result<Tensor> {
        let row_bytes = (shape[1..].iter().product::<usize>() * 4) as u64;
        let per_chunk = self.rows_per_chunk(row_bytes)? / row_multiple.max(1) * row_multiple.max(1);
        if per_chunk == 0 {
            return Err(GpuError::RowTooLarge { row_bytes: row_bytes * row_multiple as u64, max_binding: self.chunk_bytes() });
        }
        self.tensor_chunked(shape, DType::F32, Fill::Zero, per_chunk)
    }

    fn tensor(&self, shape: &[usize], dtype: DType, fill: Fill) -> Result<Tensor> {
        let row_len: usize = shape.get(1..).unwrap_or_default().iter().product();
        let per_chunk = self.rows_per_chunk((row_len * dtype.size()) as u64)?;
        self.tensor_chunked(shape, dtype, fill, per_chunk)
    }

    fn tensor_chunked(&self, shape: &[usize], dtype: DType, fill: Fill, per_chunk: usize) -> Result<Tensor> {
        if shape.is_empty() {
            return Err(GpuError::shape("zeros", "a tensor needs at least one dimension"));
        }
        let rows = shape[0];
        let row_len: usize = shape[1..].iter().product();
        let row_bytes = (row_len * dtype.size()) as u64;
        let mut segments = Vec::new();
        let mut done = 0;
        while done < rows || segments.is_empty() {
            let n = per_chunk.min(rows - done);
            let bytes = n as u64 * row_bytes;
            let (buffer, fresh) = self.alloc(bytes, STORAGE, "tensor", true, fill == Fill::HostWrite)?;
            if fill == Fill::Zero && !fresh {
                self.zero_words(&buffer, bytes.div_ceil(4))?;
            }
            segments.push(Segment { buffer: Arc::new(buffer), offset: 0, rows: n });
            done += n;
        }
        Ok(Tensor { shape: shape.to_vec(), dtype, segments })
    }

    /// Uploads f32 host data, converting to `dtype`.
    pub fn upload(&self, shape: &[usize], data: &[f32], dtype: DType) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(GpuError::shape("upload", format!("{} values for shape {shape:?}", data.len())));
        }
        let tensor = self.tensor(shape, dtype, Fill::HostWrite)?;
        let row_len = tensor.row_len();
        let mut row = 0;
        for seg in &tensor.segments {
            let values = &data[row * row_len..(row + seg.rows) * row_len];
            self.write_bytes(&seg.buffer, 0, &encode(values, dtype), false);
            row += seg.rows;
        }
        Ok(tensor)
    }

    /// Uploads raw f16 bits (as found in checkpoints) without conversion.
    pub fn upload_f16_bits(&self, shape: &[usize], bits: &[u16]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if bits.len() != numel {
            return Err(GpuError::shape("upload_f16_bits", format!("{} values for shape {shape:?}", bits.len())));
        }
        let tensor = self.tensor(shape, DType::F16, Fill::HostWrite)?;
        let row_len = tensor.row_len();
        let mut row = 0;
        for seg in &tensor.segments {
            let mut bytes: Vec<u8> = bytemuck::cast_slice(&bits[row * row_len..(row + seg.rows) * row_len]).to_vec();
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            self.write_bytes(&seg.buffer, 0, &bytes, false);
            row += seg.rows;
        }
        Ok(tensor)
    }

    /// The rows of `parts` one after another in a new tensor (one dtype and
    /// row shape), copied on the GPU: projections a checkpoint stores apart
    /// become one product.
    pub fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let first = parts.first().ok_or_else(|| GpuError::shape("concat_rows", "nothing to concatenate"))?;
        let row_shape = &first.shape[1..];
        if let Some(other) = parts.iter().find(|t| &t.shape[1..] != row_shape || t.dtype != first.dtype) {
            return Err(GpuError::shape("concat_rows", format!("{:?} {:?} after {:?} {:?}", other.shape, other.dtype, first.shape, first.dtype)));
        }
        let esize = first.dtype.size();
        if (first.row_len() * esize) % 4 != 0 {
            return Err(GpuError::shape("concat_rows", format!("rows of {} bytes are not whole 32-bit words", first.row_len() * esize)));
        }
        let mut shape = first.shape.clone();
        shape[0] = parts.iter().map(|t| t.rows()).sum();
        let out = self.empty(&shape, first.dtype)?;
        let mut at = 0;
        for part in parts {
            let mut row = 0;
            while row < part.rows() {
                let rows = part.rows_left_in_segment(row).min(out.rows_left_in_segment(at + row));
                let (src, src_off) = part.locate(row);
                let (dst, dst_off) = out.locate(at + row);
                self.copy(&src, (src_off * esize) as u64, &dst, (dst_off * esize) as u64, (rows * part.row_len() * esize) as u64);
                row += rows;
            }
            at += part.rows();
        }
        Ok(out)
    }

    /// u32 values (token ids, positions, row indices) uploaded once, to be
    /// bound by any number of dispatches.
    pub fn indices(&self, values: &[u32]) -> Result<Indices> {
        let (buffer, _) = self.alloc((values.len() * 4) as u64, STORAGE, "indices", true, true)?;
        self.write_bytes(&buffer, 0, bytemuck::cast_slice(values), false);
        Ok(Indices { buffer: Arc::new(buffer), values: values.into() })
    }

    /// Waits for all queued work and returns the tensor's values as f32.
    pub async fn read(&self, tensor: &Tensor) -> Result<Vec<f32>> {
        Ok(self.read_all(&[tensor]).await?.remove(0))
    }

    /// Several tensors' values with a single wait for the GPU.
    pub async fn read_all(&self, tensors: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
        // Copies must start and end on 4-byte boundaries: copy the aligned
        // superset of each segment and remember where its values start.
        let mut layout = Vec::new();
        let mut staging_len = 0u64;
        for tensor in tensors {
            let esize = tensor.dtype.size();
            for seg in &tensor.segments {
                let start = (seg.offset * esize) as u64;
                let end = start + (seg.rows * tensor.row_len() * esize) as u64;
                let aligned_start = start & !3;
                let aligned_end = end.next_multiple_of(4);
                layout.push((aligned_start, aligned_end - aligned_start, staging_len, start - aligned_start));
                staging_len += aligned_end - aligned_start;
            }
        }
        let (staging, _) = self.alloc(staging_len, READBACK, "readback", false, false)?;
        let segments = tensors.iter().flat_map(|t| t.segments.iter());
        for (seg, &(src, len, dst, _)) in segments.zip(&layout) {
            if len > 0 {
                self.copy(&seg.buffer, src, &staging, dst, len);
            }
        }
        let bytes = self.map_read(&staging, staging_len).await?;
        let mut at = layout.iter();
        let mut out = Vec::with_capacity(tensors.len());
        for tensor in tensors {
            let esize = tensor.dtype.size();
            let mut values = Vec::with_capacity(tensor.numel());
            for seg in &tensor.segments {
                let &(_, _, dst, skip) = at.next().expect("one layout entry per segment");
                let start = (dst + skip) as usize;
                let raw = &bytes[start..start + seg.rows * tensor.row_len() * esize];
                match tensor.dtype {
                    DType::F32 => values.extend(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                    DType::F16 => values.extend(raw.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
                }
            }
            out.push(values);
        }
        Ok(out)
    }
}

/// How a new tensor's buffers start out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Zero,
    /// Overwritten by a kernel before anything reads it.
    Any,
    /// Written from the host right away.
    HostWrite,
}

const READBACK: wgpu::BufferUsages = wgpu::BufferUsages::COPY_DST.union(wgpu::BufferUsages::MAP_READ);

/// u32 values resident on the GPU, with the host copy they were made from
/// (for validation and shapes).
#[derive(Clone, Debug)]
pub struct Indices {
    pub(crate) buffer: Arc<PooledBuffer>,
    values: Arc<[u32]>,
}

impl Indices {
    pub fn values(&self) -> &[u32] {
        &self.values
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl GpuContext {
    /// Overwrites a whole tensor with f32 host values (converted to its dtype).
    pub fn write(&self, tensor: &Tensor, data: &[f32]) -> Result<()> {
        if data.len() != tensor.numel() {
            return Err(GpuError::shape("write", format!("{} values for shape {:?}", data.len(), tensor.shape())));
        }
        let row_len = tensor.row_len();
        let clobbers_neighbour = |s: &Segment| {
            let end = s.offset + s.rows * row_len;
            s.offset % 2 != 0 || (end % 2 != 0 && end + 1 < (s.buffer.metered_bytes / 2) as usize)
        };
        if tensor.dtype == DType::F16 && tensor.segments.iter().any(clobbers_neighbour) {
            return Err(GpuError::shape("write", "an f16 view must start and end on whole 32-bit words"));
        }
        let mut row = 0;
        for seg in &tensor.segments {
            let values = &data[row * row_len..(row + seg.rows) * row_len];
            let bytes = encode(values, tensor.dtype);
            self.write_bytes(&seg.buffer, (seg.offset * tensor.dtype.size()) as u64, &bytes, true);
            row += seg.rows;
        }
        Ok(())
    }
}
