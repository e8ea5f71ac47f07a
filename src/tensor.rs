//! Host tensor views: borrowed, strided, rank-4, f32/f16/bf16.
//!
//! Prefill tensors are BSND (`[batch, tokens, heads, head_dim]`), caches are `[batch, heads,
//! entries, head_dim]`. The innermost dimension must be contiguous; the others may have any
//! stride, so a slice of a fused QKV projection can be passed without a copy.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::{Error, Result};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Every element type.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Unit roundoff of the type (half the distance from 1.0 to the next value).
    pub fn epsilon(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64 / 2.0,
            DType::F16 => 2f64.powi(-11),
            DType::BF16 => 2f64.powi(-8),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::range("dtype", s, "expected f32, f16 or bf16")),
        }
    }
}

/// A scalar type the kernels read and write. Arithmetic is always f32.
pub trait Element: bytemuck::Pod + Default + Send + Sync + fmt::Debug + 'static {
    /// The element type's tag.
    const DTYPE: DType;
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// The value nearest `x`.
    fn from_f32(x: f32) -> Self;
    /// Widen a run of elements (vectorised by `half` where the CPU allows).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Narrow a run of f32 values with round-to-nearest-even.
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    #[inline]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
}

macro_rules! half_element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
            #[inline]
            fn widen(src: &[Self], dst: &mut [f32]) {
                use half::slice::HalfFloatSliceExt;
                src.convert_to_f32_slice(dst)
            }
            #[inline]
            fn narrow(src: &[f32], dst: &mut [Self]) {
                use half::slice::HalfFloatSliceExt;
                dst.convert_from_f32_slice(src)
            }
        }
    };
}
half_element!(f16, DType::F16);
half_element!(bf16, DType::BF16);

/// Borrowed element data of one of the supported types.
#[derive(Clone, Copy, Debug)]
pub enum HostData<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
}

/// Mutably borrowed element data.
#[derive(Debug)]
pub enum HostDataMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f16 elements.
    F16(&'a mut [f16]),
    /// bf16 elements.
    BF16(&'a mut [bf16]),
}

macro_rules! data_from {
    ($t:ty, $v:ident) => {
        impl<'a> From<&'a [$t]> for HostData<'a> {
            fn from(s: &'a [$t]) -> Self {
                HostData::$v(s)
            }
        }
        impl<'a> From<&'a Vec<$t>> for HostData<'a> {
            fn from(s: &'a Vec<$t>) -> Self {
                HostData::$v(s)
            }
        }
        impl<'a> From<&'a mut [$t]> for HostDataMut<'a> {
            fn from(s: &'a mut [$t]) -> Self {
                HostDataMut::$v(s)
            }
        }
        impl<'a> From<&'a mut Vec<$t>> for HostDataMut<'a> {
            fn from(s: &'a mut Vec<$t>) -> Self {
                HostDataMut::$v(s)
            }
        }
    };
}
data_from!(f32, F32);
data_from!(f16, F16);
data_from!(bf16, BF16);

impl<'a> HostData<'a> {
    /// The elements' bytes (what a device copy moves).
    pub fn as_bytes(&self) -> &'a [u8] {
        match *self {
            HostData::F32(s) => bytemuck::cast_slice(s),
            HostData::F16(s) => bytemuck::cast_slice(s),
            HostData::BF16(s) => bytemuck::cast_slice(s),
        }
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(s) => s.len(),
            HostData::F16(s) => s.len(),
            HostData::BF16(s) => s.len(),
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The typed slice, if the element type is `T`.
    pub fn typed<T: Element>(&self) -> Option<&'a [T]> {
        match *self {
            HostData::F32(s) => bytemuck::try_cast_slice(s).ok().filter(|_| T::DTYPE == DType::F32),
            HostData::F16(s) => bytemuck::try_cast_slice(s).ok().filter(|_| T::DTYPE == DType::F16),
            HostData::BF16(s) => bytemuck::try_cast_slice(s).ok().filter(|_| T::DTYPE == DType::BF16),
        }
    }
    /// Reads element `o` as f64 (for oracles; slow).
    pub fn get(&self, o: usize) -> f64 {
        match *self {
            HostData::F32(s) => s[o] as f64,
            HostData::F16(s) => s[o].to_f64(),
            HostData::BF16(s) => s[o].to_f64(),
        }
    }
}

impl HostDataMut<'_> {
    /// The same elements, borrowed again for a shorter time.
    pub fn reborrow(&mut self) -> HostDataMut<'_> {
        match self {
            HostDataMut::F32(s) => HostDataMut::F32(s),
            HostDataMut::F16(s) => HostDataMut::F16(s),
            HostDataMut::BF16(s) => HostDataMut::BF16(s),
        }
    }

    /// The elements' bytes, writable (what a device copy fills).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            HostDataMut::F32(s) => bytemuck::cast_slice_mut(s),
            HostDataMut::F16(s) => bytemuck::cast_slice_mut(s),
            HostDataMut::BF16(s) => bytemuck::cast_slice_mut(s),
        }
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostDataMut::F32(_) => DType::F32,
            HostDataMut::F16(_) => DType::F16,
            HostDataMut::BF16(_) => DType::BF16,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostDataMut::F32(s) => s.len(),
            HostDataMut::F16(s) => s.len(),
            HostDataMut::BF16(s) => s.len(),
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The same elements, read-only.
    pub fn as_data(&self) -> HostData<'_> {
        match self {
            HostDataMut::F32(s) => HostData::F32(s),
            HostDataMut::F16(s) => HostData::F16(s),
            HostDataMut::BF16(s) => HostData::BF16(s),
        }
    }
    /// The typed slice, if the element type is `T`.
    pub fn typed_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        match self {
            HostDataMut::F32(s) => bytemuck::try_cast_slice_mut(s).ok(),
            HostDataMut::F16(s) => bytemuck::try_cast_slice_mut(s).ok(),
            HostDataMut::BF16(s) => bytemuck::try_cast_slice_mut(s).ok(),
        }
    }
}

/// Row-major strides of `shape`. A product that overflows saturates: such a view can address
/// no buffer, and [`check_layout`] rejects it.
pub(crate) fn contiguous_strides(shape: [usize; 4]) -> [usize; 4] {
    let s2 = shape[3];
    let s1 = shape[2].saturating_mul(s2);
    [shape[1].saturating_mul(s1), s1, s2, 1]
}

/// Elements a view of `shape` claims, or `None` on overflow.
pub(crate) fn elements(shape: [usize; 4]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n))
}

/// Whether no two indices of the view address the same element: the dims of size > 1, taken by
/// increasing stride, each step over everything the smaller ones span. (A sufficient condition:
/// views that interleave dims without nesting them are refused too.)
pub(crate) fn disjoint(shape: [usize; 4], strides: [usize; 4]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    // A fixed array, not a Vec: validation runs on every decode step and must not allocate.
    let mut dims = [(0usize, 0usize); 4];
    let mut n = 0;
    for i in (0..4).filter(|&i| shape[i] > 1) {
        dims[n] = (strides[i], shape[i]);
        n += 1;
    }
    dims[..n].sort_unstable();
    let mut span = 1usize;
    for &(stride, size) in &dims[..n] {
        if stride < span {
            return false;
        }
        match stride.checked_mul(size - 1).and_then(|x| x.checked_add(span)) {
            Some(s) => span = s,
            None => return false,
        }
    }
    true
}

/// Smallest buffer length that holds every element a view addresses, or `None` on overflow.
fn extent(shape: [usize; 4], strides: [usize; 4]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0usize;
    for i in 0..4 {
        last = last.checked_add((shape[i] - 1).checked_mul(strides[i])?)?;
    }
    last.checked_add(1)
}

/// What validation needs of a tensor wherever its memory lives (host views here, device views
/// in `cuda::device`): shape, element strides, dtype and the elements its buffer holds.
pub trait Layout {
    /// The shape.
    fn shape(&self) -> [usize; 4];
    /// The strides, in elements.
    fn strides(&self) -> [usize; 4];
    /// The element type.
    fn dtype(&self) -> DType;
    /// Elements of the buffer from the view's first element on.
    fn elements(&self) -> usize;
    /// The strides stay inside the buffer, the last dim is contiguous, and the view claims no
    /// more elements than the buffer holds.
    fn check_layout(&self, what: &'static str) -> Result<()> {
        check_layout(what, self.shape(), self.strides(), self.elements())
    }
    /// [`Layout::check_layout`] for an output: also no element addressed twice.
    fn check_output_layout(&self, what: &'static str) -> Result<()> {
        check_output_layout(what, self.shape(), self.strides(), self.elements())
    }
}

/// Implements [`Layout`] for a view type with `shape` and `strides` fields, its dtype and element
/// count given as expressions over the view (`|v| dtype, elements`).
macro_rules! impl_layout {
    ($t:ident, |$v:ident| $dtype:expr, $elements:expr) => {
        impl $crate::tensor::Layout for $t<'_> {
            fn shape(&self) -> [usize; 4] {
                self.shape
            }
            fn strides(&self) -> [usize; 4] {
                self.strides
            }
            fn dtype(&self) -> $crate::tensor::DType {
                let $v = self;
                $dtype
            }
            fn elements(&self) -> usize {
                let $v = self;
                $elements
            }
        }
    };
}
#[allow(unused_imports)] // also used by `cuda::device` (feature `cuda`)
pub(crate) use impl_layout;

impl_layout!(TensorView, |v| v.data.dtype(), v.data.len());
impl_layout!(TensorViewMut, |v| v.data.dtype(), v.data.len());

/// Checks that `shape`/`strides` describe a valid view into `len` elements: the innermost stride
/// is 1, every addressed element lies in the buffer, and the view claims no more elements than
/// the buffer holds (a broadcast view of a few elements may not pose as a huge tensor: every size
/// a call derives from its shapes is then bounded by memory the caller really holds).
pub(crate) fn check_layout(what: &'static str, shape: [usize; 4], strides: [usize; 4], len: usize) -> Result<()> {
    if strides[3] != 1 {
        return Err(Error::Layout { what, detail: format!("innermost stride must be 1 (got {})", strides[3]) });
    }
    match (extent(shape, strides), elements(shape)) {
        (None, _) | (_, None) => {
            Err(Error::Layout { what, detail: format!("shape {shape:?} with strides {strides:?} overflows") })
        }
        (Some(n), _) if n > len => Err(Error::Layout {
            what,
            detail: format!("shape {shape:?} with strides {strides:?} needs {n} elements, buffer has {len}"),
        }),
        (_, Some(n)) if n > len => Err(Error::Layout {
            what,
            detail: format!(
                "shape {shape:?} claims {n} elements but its buffer holds {len} (strides {strides:?} repeat elements)"
            ),
        }),
        _ => Ok(()),
    }
}

/// Checks an output view: [`check_layout`], and no element addressed twice — kernels write
/// disjoint rows from several threads, so overlapping (e.g. zero) strides would be a data race.
/// (An output cannot alias an input: it is borrowed mutably, the inputs shared.)
pub(crate) fn check_output_layout(
    what: &'static str,
    shape: [usize; 4],
    strides: [usize; 4],
    len: usize,
) -> Result<()> {
    check_layout(what, shape, strides, len)?;
    if !disjoint(shape, strides) {
        return Err(Error::Layout {
            what,
            detail: format!(
                "shape {shape:?} with strides {strides:?} addresses some elements twice (an output's rows must not overlap)"
            ),
        });
    }
    Ok(())
}

/// Shape and element offset of `start..start + len` along `dim`.
fn narrowed(
    shape: [usize; 4],
    strides: [usize; 4],
    dim: usize,
    start: usize,
    len: usize,
) -> Result<([usize; 4], usize)> {
    if dim >= 4 || start.checked_add(len).is_none_or(|end| end > shape[dim]) {
        return Err(Error::Layout {
            what: "narrow",
            detail: format!("range {start}..{} of dim {dim} is outside shape {shape:?}", start.saturating_add(len)),
        });
    }
    let mut s = shape;
    s[dim] = len;
    Ok((s, if len == 0 { 0 } else { start * strides[dim] }))
}

/// A borrowed rank-4 tensor (read-only).
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    data: HostData<'a>,
    shape: [usize; 4],
    strides: [usize; 4],
}

impl<'a> TensorView<'a> {
    /// A contiguous (row-major) view. The buffer length is checked when the view is used.
    pub fn new(data: impl Into<HostData<'a>>, shape: [usize; 4]) -> Self {
        TensorView { data: data.into(), shape, strides: contiguous_strides(shape) }
    }

    /// A view with explicit element strides (the last must be 1).
    pub fn strided(data: impl Into<HostData<'a>>, shape: [usize; 4], strides: [usize; 4]) -> Self {
        TensorView { data: data.into(), shape, strides }
    }

    /// A contiguous THD view `[tokens, heads, head_dim]` (ragged batches, SPEC §7.1), held as
    /// `[1, tokens, heads, head_dim]`.
    pub fn thd(data: impl Into<HostData<'a>>, [t, h, d]: [usize; 3]) -> Self {
        Self::new(data, [1, t, h, d])
    }

    /// The elements.
    pub fn data(&self) -> HostData<'a> {
        self.data
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    /// The shape.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// The strides, in elements.
    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }
    /// Whether the view is contiguous.
    pub fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(self.shape)
    }

    /// Element offset of `[i0, i1, i2, 0]`.
    #[inline(always)]
    pub fn offset(&self, i0: usize, i1: usize, i2: usize) -> usize {
        i0 * self.strides[0] + i1 * self.strides[1] + i2 * self.strides[2]
    }

    pub(crate) fn check(&self, what: &'static str) -> Result<()> {
        check_layout(what, self.shape, self.strides, self.data.len())
    }

    /// The sub-view `start..start + len` along `dim` (e.g. a range of heads), without a copy.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<TensorView<'a>> {
        let (shape, off) = narrowed(self.shape, self.strides, dim, start, len)?;
        let data = match self.data {
            HostData::F32(s) => HostData::F32(s.get(off..).unwrap_or(&[])),
            HostData::F16(s) => HostData::F16(s.get(off..).unwrap_or(&[])),
            HostData::BF16(s) => HostData::BF16(s.get(off..).unwrap_or(&[])),
        };
        Ok(TensorView { data, shape, strides: self.strides })
    }

    /// The same memory with dims `a` and `b` swapped (both among the first three, so rows stay
    /// contiguous): e.g. BSND `[B, L, H, D]` seen as a `[B, H, L, D]` cache, without a copy.
    pub fn transpose(&self, a: usize, b: usize) -> Result<TensorView<'a>> {
        if a >= 3 || b >= 3 {
            return Err(Error::Layout {
                what: "transpose",
                detail: format!("dims {a} and {b}: only dims 0..3 can swap"),
            });
        }
        let (mut shape, mut strides) = (self.shape, self.strides);
        shape.swap(a, b);
        strides.swap(a, b);
        Ok(TensorView { data: self.data, shape, strides })
    }

    /// The typed slice, if the element type is `T`.
    pub fn typed<T: Element>(&self) -> Option<&'a [T]> {
        self.data.typed()
    }

    /// Reads one element as f64 (for oracles and tests; slow).
    pub fn get(&self, i: [usize; 4]) -> f64 {
        self.data.get(self.offset(i[0], i[1], i[2]) + i[3])
    }
}

/// A mutably borrowed rank-4 tensor (an output).
#[derive(Debug)]
pub struct TensorViewMut<'a> {
    data: HostDataMut<'a>,
    shape: [usize; 4],
    strides: [usize; 4],
}

impl<'a> TensorViewMut<'a> {
    /// A contiguous view of `data` of `shape`.
    pub fn new(data: impl Into<HostDataMut<'a>>, shape: [usize; 4]) -> Self {
        TensorViewMut { data: data.into(), shape, strides: contiguous_strides(shape) }
    }
    /// A view of `data` of `shape` with `strides`, in elements.
    pub fn strided(data: impl Into<HostDataMut<'a>>, shape: [usize; 4], strides: [usize; 4]) -> Self {
        TensorViewMut { data: data.into(), shape, strides }
    }
    /// A contiguous THD output `[tokens, heads, head_dim]`, held as `[1, tokens, heads, head_dim]`.
    pub fn thd(data: impl Into<HostDataMut<'a>>, [t, h, d]: [usize; 3]) -> Self {
        Self::new(data, [1, t, h, d])
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    /// The shape.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// The strides, in elements.
    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }
    #[inline(always)]
    /// The element offset of row `(i0, i1, i2)`.
    pub fn offset(&self, i0: usize, i1: usize, i2: usize) -> usize {
        i0 * self.strides[0] + i1 * self.strides[1] + i2 * self.strides[2]
    }
    /// The sub-view `start..start + len` along `dim`, borrowing from `self`.
    pub fn narrow(&mut self, dim: usize, start: usize, len: usize) -> Result<TensorViewMut<'_>> {
        let (shape, off) = narrowed(self.shape, self.strides, dim, start, len)?;
        let data = match &mut self.data {
            HostDataMut::F32(s) => HostDataMut::F32(s.get_mut(off..).unwrap_or(&mut [])),
            HostDataMut::F16(s) => HostDataMut::F16(s.get_mut(off..).unwrap_or(&mut [])),
            HostDataMut::BF16(s) => HostDataMut::BF16(s.get_mut(off..).unwrap_or(&mut [])),
        };
        Ok(TensorViewMut { data, shape, strides: self.strides })
    }

    /// The elements, mutably.
    pub fn data_mut(&mut self) -> &mut HostDataMut<'a> {
        &mut self.data
    }
    /// The typed slice, if the element type is `T`.
    pub fn typed_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        self.data.typed_mut()
    }
    /// Writes one element, rounding from f64 (for oracles; slow).
    pub fn set(&mut self, i: [usize; 4], x: f64) {
        let o = self.offset(i[0], i[1], i[2]) + i[3];
        match &mut self.data {
            HostDataMut::F32(s) => s[o] = x as f32,
            HostDataMut::F16(s) => s[o] = f16::from_f64(x),
            HostDataMut::BF16(s) => s[o] = bf16::from_f64(x),
        }
    }
    /// A read-only view of the same memory.
    pub fn as_view(&self) -> TensorView<'_> {
        TensorView { data: self.data.as_data(), shape: self.shape, strides: self.strides }
    }
}

/// Owned element storage.
#[derive(Clone, Debug, PartialEq)]
pub enum HostBuffer {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
}

/// An owned contiguous rank-4 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// The elements.
    pub data: HostBuffer,
    /// The shape.
    pub shape: [usize; 4],
}

impl HostTensor {
    /// A tensor filled with `value` (use NaN to poison an output before a kernel writes it).
    pub fn full(dtype: DType, shape: [usize; 4], value: f32) -> Self {
        let n = shape.iter().product();
        let data = match dtype {
            DType::F32 => HostBuffer::F32(vec![value; n]),
            DType::F16 => HostBuffer::F16(vec![f16::from_f32(value); n]),
            DType::BF16 => HostBuffer::BF16(vec![bf16::from_f32(value); n]),
        };
        HostTensor { data, shape }
    }
    /// A tensor of `shape` filled with zeros.
    pub fn zeros(dtype: DType, shape: [usize; 4]) -> Self {
        Self::full(dtype, shape, 0.0)
    }
    /// A tensor of `dtype` from its raw little-endian bytes (e.g. copied back from a device).
    pub fn from_bytes(bytes: &[u8], shape: [usize; 4], dtype: DType) -> Self {
        let data = match dtype {
            DType::F32 => HostBuffer::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => HostBuffer::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => HostBuffer::BF16(bytemuck::pod_collect_to_vec(bytes)),
        };
        HostTensor { data, shape }
    }

    /// Rounds f32 values to `dtype`.
    pub fn from_f32(values: &[f32], shape: [usize; 4], dtype: DType) -> Self {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "HostTensor::from_f32: length/shape mismatch");
        let data = match dtype {
            DType::F32 => HostBuffer::F32(values.to_vec()),
            DType::F16 => HostBuffer::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => HostBuffer::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        HostTensor { data, shape }
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            HostBuffer::F32(_) => DType::F32,
            HostBuffer::F16(_) => DType::F16,
            HostBuffer::BF16(_) => DType::BF16,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A view of the tensor.
    pub fn view(&self) -> TensorView<'_> {
        match &self.data {
            HostBuffer::F32(v) => TensorView::new(v.as_slice(), self.shape),
            HostBuffer::F16(v) => TensorView::new(v.as_slice(), self.shape),
            HostBuffer::BF16(v) => TensorView::new(v.as_slice(), self.shape),
        }
    }
    /// A mutable view of the tensor.
    pub fn view_mut(&mut self) -> TensorViewMut<'_> {
        let shape = self.shape;
        match &mut self.data {
            HostBuffer::F32(v) => TensorViewMut::new(v.as_mut_slice(), shape),
            HostBuffer::F16(v) => TensorViewMut::new(v.as_mut_slice(), shape),
            HostBuffer::BF16(v) => TensorViewMut::new(v.as_mut_slice(), shape),
        }
    }
    /// The elements, borrowed (e.g. as a page pool of a [`crate::KvCache`]).
    pub fn data(&self) -> HostData<'_> {
        match &self.data {
            HostBuffer::F32(v) => HostData::F32(v),
            HostBuffer::F16(v) => HostData::F16(v),
            HostBuffer::BF16(v) => HostData::BF16(v),
        }
    }
    /// The elements, mutably borrowed (e.g. as a page pool of a [`crate::KvCacheMut`]).
    pub fn data_mut(&mut self) -> HostDataMut<'_> {
        match &mut self.data {
            HostBuffer::F32(v) => HostDataMut::F32(v),
            HostBuffer::F16(v) => HostDataMut::F16(v),
            HostBuffer::BF16(v) => HostDataMut::BF16(v),
        }
    }
    /// All values widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            HostBuffer::F32(v) => v.clone(),
            HostBuffer::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostBuffer::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
    /// The same values rounded to another type.
    pub fn cast(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        HostTensor::from_f32(&self.to_f32_vec(), self.shape, dtype)
    }
}
