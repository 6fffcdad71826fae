//! KV caches paged by the GPU's virtual memory (the CUDA driver's VMM API).
//!
//! A cache in the decode step's capacity layout (`passes::inplace`: `rows` rows, each holding
//! up to `cap` tokens of `inner` bytes) lives in one reserved range of virtual addresses, laid
//! out for many more tokens than it holds. Physical memory is mapped into each row's part of
//! that range page by page (the driver's allocation granularity, 2 MiB on Hopper) as the
//! sequence grows, so:
//!
//! - a cache costs the physical memory of the tokens it holds (rounded up to a page per row),
//!   not of a capacity chosen in advance;
//! - growing never copies: a new token lands on a page that is already mapped, or on a new page
//!   mapped behind the others;
//! - the cache's address never changes, so the decode step's CUDA graphs stay valid while it
//!   grows. Only outgrowing the reserved range (by default 64K tokens a row) reserves a larger
//!   range and maps the same pages into it, still without copying.
//!
//! This is the paging of vAttention (Prabhu et al., 2024) rather than of PagedAttention's block
//! tables: the page table is the GPU's, so the attention kernels keep reading the cache through
//! an affine view, with no indirection in their inner loop (docs/ptx-codegen.md).

use crate::cuda::Gpu;
use crate::{err, Error, Result};
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};
use std::sync::Arc;

/// Tokens a row is laid out for when a cache is first paged (the reserved range grows beyond
/// it, see [`PagedCache::ensure`]); `RINGJIT_KV_RESERVE` overrides it.
pub const DEFAULT_RESERVE_TOKENS: usize = 65536;

/// The tokens a row is first laid out for: `RINGJIT_KV_RESERVE` or [`DEFAULT_RESERVE_TOKENS`];
/// a value that is not a positive whole number is an error that says so.
pub fn reserve_tokens() -> Result<usize> {
    parse_reserve(std::env::var("RINGJIT_KV_RESERVE").ok().as_deref())
}

fn parse_reserve(v: Option<&str>) -> Result<usize> {
    match v {
        None => Ok(DEFAULT_RESERVE_TOKENS),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => err(format!(
                "RINGJIT_KV_RESERVE must be a positive number of tokens (the KV caches' first reservation a row), not `{v}`"
            )),
        },
    }
}

fn ck(r: sys::CUresult, what: &str) -> Result<()> {
    r.result().map_err(|e| Error(format!("{what}: {e}")))
}

fn prop(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: a plain C struct; all-zero is its documented default before the fields are set.
    let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = ordinal;
    p
}

/// The page size of device memory mapped through the VMM API.
pub fn granularity(gpu: &Gpu) -> Result<usize> {
    gpu.ctx
        .bind_to_thread()
        .map_err(|e| Error(format!("binding the CUDA context: {e}")))?;
    let p = prop(gpu.ctx.ordinal() as i32);
    let mut g = 0usize;
    // SAFETY: `p` describes device memory of this context's device; `g` is written.
    ck(
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut g,
                &p,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        },
        "querying the GPU's page size",
    )?;
    if g == 0 {
        return err("the driver reports a page size of 0");
    }
    Ok(g)
}

/// Where each of `rows` rows' pages go: page `j` of row `r` at `r·pitch + j·page`.
fn page_offset(pitch: usize, page: usize, row: usize, j: usize) -> usize {
    row * pitch + j * page
}

/// Pages a row needs to hold `tokens` tokens of `inner` bytes.
pub fn pages_for(tokens: usize, inner: usize, page: usize) -> usize {
    (tokens * inner).div_ceil(page)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A capacity (tokens a row) of at least `tokens` at which a row of tokens of each size in
/// `inners` is whole pages (so rows start on page boundaries and the kernels' row stride,
/// `cap · inner`, is the pitch).
pub fn cap_for(tokens: usize, inners: &[usize], page: usize) -> usize {
    let unit = inners.iter().fold(1usize, |u, &i| {
        let need = page / gcd(page, i.max(1));
        u / gcd(u, need) * need
    });
    tokens.max(1).div_ceil(unit) * unit
}

/// One KV cache paged by virtual memory: `rows` rows of up to `cap()` tokens of `inner`
/// bytes, row `r` starting at `ptr() + r·pitch`, the first `tokens` tokens of each valid.
pub struct PagedCache {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: i32,
    base: u64,
    pub rows: usize,
    /// bytes from one row to the next (whole pages)
    pub pitch: usize,
    pub inner: usize,
    /// valid tokens per row
    pub tokens: usize,
    page: usize,
    /// the pages mapped into each row, in order
    pages: Vec<Vec<sys::CUmemGenericAllocationHandle>>,
}

impl std::fmt::Debug for PagedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PagedCache({} rows × {} of {} tokens, {} pages of {} bytes)",
            self.rows,
            self.tokens,
            self.cap(),
            self.mapped_pages(),
            self.page
        )
    }
}

impl PagedCache {
    /// An empty cache of `rows` rows of `inner`-byte tokens, laid out for `cap` tokens a row
    /// (a capacity from [`cap_for`]; nothing is mapped yet).
    pub fn new(gpu: &Gpu, rows: usize, inner: usize, cap: usize) -> Result<PagedCache> {
        let page = granularity(gpu)?;
        let pitch = cap * inner;
        if rows == 0 || pitch == 0 || !pitch.is_multiple_of(page) {
            return err(format!(
                "internal: a paged cache of {rows} rows of {cap} tokens of {inner} bytes (pages of {page})"
            ));
        }
        let base = reserve_va(rows * pitch, page)?;
        Ok(PagedCache {
            ctx: gpu.ctx.clone(),
            stream: gpu.stream.clone(),
            ordinal: gpu.ctx.ordinal() as i32,
            base,
            rows,
            pitch,
            inner,
            tokens: 0,
            page,
            pages: vec![Vec::new(); rows],
        })
    }

    /// The address of row 0.
    pub fn ptr(&self) -> u64 {
        self.base
    }

    /// Tokens a row can hold at its current pitch.
    pub fn cap(&self) -> usize {
        self.pitch / self.inner
    }

    /// Pages mapped, over all rows.
    pub fn mapped_pages(&self) -> usize {
        self.pages.iter().map(Vec::len).sum()
    }

    /// Physical bytes mapped.
    pub fn mapped_bytes(&self) -> usize {
        self.mapped_pages() * self.page
    }

    /// Lays the rows out for `cap` tokens (a capacity from [`cap_for`], not below the current
    /// one): the pages move to a larger reserved range, mapped at their new places; no data is
    /// copied. The address changes (the step's CUDA graphs must be captured again).
    pub fn set_cap(&mut self, cap: usize) -> Result<()> {
        let pitch = cap * self.inner;
        if pitch == self.pitch {
            return Ok(());
        }
        if pitch < self.pitch || !pitch.is_multiple_of(self.page) {
            return err(format!(
                "internal: a paged cache of {} tokens a row asked to hold {cap}",
                self.cap()
            ));
        }
        self.bind()?;
        self.move_to(pitch)
    }

    /// Maps the pages that `tokens` tokens a row need (at most [`PagedCache::cap`]). Out of
    /// memory is an error that says how much is mapped; the cache stays usable.
    pub fn ensure(&mut self, tokens: usize) -> Result<()> {
        if tokens > self.cap() {
            return err(format!(
                "internal: {tokens} tokens asked of a paged cache of {} a row",
                self.cap()
            ));
        }
        let need = pages_for(tokens, self.inner, self.page);
        if self.pages.iter().all(|row| row.len() >= need) {
            return Ok(()); // most steps: the token lands on a mapped page
        }
        self.bind()?;
        for r in 0..self.rows {
            while self.pages[r].len() < need {
                let j = self.pages[r].len();
                let h = self.create_page().map_err(|e| {
                    Error(format!(
                        "{e} (the KV cache holds {} MiB in {} pages, growing to {tokens} tokens a row)",
                        self.mapped_bytes() >> 20,
                        self.mapped_pages()
                    ))
                })?;
                let at = self.base + page_offset(self.pitch, self.page, r, j) as u64;
                if let Err(e) = self.map(at, h) {
                    // SAFETY: `h` was created above and is mapped nowhere.
                    unsafe { sys::cuMemRelease(h) };
                    return Err(e);
                }
                self.pages[r].push(h);
            }
        }
        Ok(())
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error(format!("binding the CUDA context: {e}")))
    }

    fn create_page(&self) -> Result<sys::CUmemGenericAllocationHandle> {
        let p = prop(self.ordinal);
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: `p` describes device memory of our device; `h` is written on success.
        ck(
            unsafe { sys::cuMemCreate(&mut h, self.page, &p, 0) },
            &format!(
                "out of GPU memory? allocating a {} KiB page of a KV cache",
                self.page >> 10
            ),
        )?;
        Ok(h)
    }

    /// Maps page `h` at `at` (inside our reserved range) with read/write access.
    fn map(&self, at: u64, h: sys::CUmemGenericAllocationHandle) -> Result<()> {
        // SAFETY: `at` is page-aligned inside our reservation and not mapped; `h` is one page.
        ck(
            unsafe { sys::cuMemMap(at, self.page, 0, h, 0) },
            "mapping a KV cache page",
        )?;
        // SAFETY: a plain C struct, zero is a valid start.
        let mut a: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
        a.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        a.location.id = self.ordinal;
        a.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        // SAFETY: the range was just mapped.
        let r = unsafe { sys::cuMemSetAccess(at, self.page, &a, 1) };
        if let Err(e) = ck(r, "giving the GPU access to a KV cache page") {
            // SAFETY: mapped above.
            unsafe { sys::cuMemUnmap(at, self.page) };
            return Err(e);
        }
        Ok(())
    }

    /// Every page mapped at the same place in a new range of row pitch `pitch`.
    fn move_to(&mut self, pitch: usize) -> Result<()> {
        // work queued on the old addresses finishes first
        self.stream
            .synchronize()
            .map_err(|e| Error(format!("waiting for the GPU before moving a KV cache: {e}")))?;
        let base = reserve_va(self.rows * pitch, self.page)?;
        let mut done: Vec<u64> = Vec::new();
        for (r, row) in self.pages.iter().enumerate() {
            for (j, &h) in row.iter().enumerate() {
                let at = base + page_offset(pitch, self.page, r, j) as u64;
                if let Err(e) = self.map(at, h) {
                    for &p in &done {
                        // SAFETY: mapped above in the new range.
                        unsafe { sys::cuMemUnmap(p, self.page) };
                    }
                    // SAFETY: reserved above, now empty.
                    unsafe { sys::cuMemAddressFree(base, self.rows * pitch) };
                    return Err(e);
                }
                done.push(at);
            }
        }
        self.unmap_all();
        // SAFETY: our old reservation, now unmapped.
        unsafe { sys::cuMemAddressFree(self.base, self.rows * self.pitch) };
        self.base = base;
        self.pitch = pitch;
        Ok(())
    }

    /// Copies `tokens` tokens a row from the plain layout at `src` (`rows` rows of `tokens`
    /// tokens) into the cache, mapping the pages first, and makes them its valid tokens
    /// (stream-ordered).
    pub fn copy_in(&mut self, src: u64, tokens: usize) -> Result<()> {
        self.ensure(tokens)?;
        let width = tokens * self.inner;
        copy_pages(
            &self.stream,
            src,
            self.base,
            self.pitch,
            self.page,
            width,
            self.rows,
            true,
        )?;
        self.tokens = tokens;
        Ok(())
    }

    /// Copies the valid tokens out to the plain layout at `dst` (`rows` rows of `tokens`
    /// tokens; stream-ordered).
    pub fn copy_out(&self, dst: u64) -> Result<()> {
        self.bind()?;
        let width = self.tokens * self.inner;
        copy_pages(
            &self.stream,
            dst,
            self.base,
            self.pitch,
            self.page,
            width,
            self.rows,
            false,
        )
    }

    /// Unmaps every page from the current range (the pages themselves stay).
    fn unmap_all(&self) {
        for (r, row) in self.pages.iter().enumerate() {
            for j in 0..row.len() {
                let at = self.base + page_offset(self.pitch, self.page, r, j) as u64;
                // SAFETY: mapped by `ensure` or `move_to` at exactly this place.
                unsafe { sys::cuMemUnmap(at, self.page) };
            }
        }
    }
}

/// Copies between the plain layout at `plain` (`rows` rows of `width` bytes, back to back) and
/// rows `pitch` apart from `base` (towards the rows when `into_rows`), one copy per page, so
/// that no copy spans two pages: each page is an allocation of its own, and the driver refused
/// (CUDA_ERROR_INVALID_VALUE, on an H100) a pitched 2D copy over rows in separate pages.
/// Stream-ordered.
#[allow(clippy::too_many_arguments)]
fn copy_pages(
    stream: &CudaStream,
    plain: u64,
    base: u64,
    pitch: usize,
    page: usize,
    width: usize,
    rows: usize,
    into_rows: bool,
) -> Result<()> {
    for r in 0..rows {
        let mut lo = 0;
        while lo < width {
            let hi = ((lo / page + 1) * page).min(width);
            let p = plain + (r * width + lo) as u64;
            let q = base + (r * pitch + lo) as u64;
            let (dst, src) = if into_rows { (q, p) } else { (p, q) };
            // SAFETY: both ranges lie inside live device memory: the plain buffer holds
            // rows × width bytes (the callers size it so) and the page is mapped.
            let res = unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, hi - lo, stream.cu_stream()) };
            ck(res, "copying a KV cache on the GPU")?;
            lo = hi;
        }
    }
    Ok(())
}

fn reserve_va(bytes: usize, page: usize) -> Result<u64> {
    let mut base: sys::CUdeviceptr = 0;
    // SAFETY: asks the driver for a fresh range; `base` is written on success.
    ck(
        unsafe { sys::cuMemAddressReserve(&mut base, bytes, page, 0, 0) },
        &format!("reserving {} MiB of GPU virtual addresses for a KV cache", bytes >> 20),
    )?;
    Ok(base)
}

impl Drop for PagedCache {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // work still queued on the cache finishes before its memory goes
        let _ = self.stream.synchronize();
        self.unmap_all();
        for row in &self.pages {
            for &h in row {
                // SAFETY: created by `create_page` and no longer mapped.
                unsafe { sys::cuMemRelease(h) };
            }
        }
        // SAFETY: our reservation, now unmapped.
        unsafe { sys::cuMemAddressFree(self.base, self.rows * self.pitch) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_positive_token_count() {
        assert_eq!(parse_reserve(None).unwrap(), DEFAULT_RESERVE_TOKENS);
        assert_eq!(parse_reserve(Some(" 4096 ")).unwrap(), 4096);
        for bad in ["0", "-5", "lots", ""] {
            let e = parse_reserve(Some(bad)).unwrap_err();
            assert!(e.0.contains("RINGJIT_KV_RESERVE") && e.0.contains(bad), "{e}");
        }
    }

    #[test]
    fn rows_are_whole_pages_and_pages_cover_the_tokens() {
        let page = 2 << 20;
        // Ring-mini: 256-byte tokens, 8192 to a page
        assert_eq!(cap_for(65536, &[256], page), 65536);
        assert_eq!(cap_for(1, &[256], page), 8192);
        assert_eq!(cap_for(8193, &[256, 256], page), 16384);
        assert_eq!(pages_for(8192, 256, page), 1);
        assert_eq!(pages_for(8193, 256, page), 2);
        assert_eq!(pages_for(0, 256, page), 0);
        // token sizes that do not divide the page: rows are still whole pages for each
        for inners in [&[384usize][..], &[96, 256], &[6, 10]] {
            for tokens in [1, 5000, 70000] {
                let cap = cap_for(tokens, inners, page);
                assert!(cap >= tokens);
                for &i in inners {
                    assert_eq!(cap * i % page, 0, "{inners:?} {tokens}");
                }
            }
        }
        assert_eq!(page_offset(8 * page, page, 3, 1), 25 * page);
    }
}
