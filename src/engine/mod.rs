//! The serving-loop interface of SPEC §7: ragged batches (THD queries with `cu_q`), chunked
//! prefill with [`PlanState`](crate::plan::PlanState), paged or contiguous KV caches
//! ([`KvCache`], [`KvCacheMut`]), `append`, attention over a cache with the bottom-right causal
//! rule and log-sum-exps, and a caller-owned [`Workspace`].
//!
//! Every call is validated here, once ([`args`]), and run by a backend
//! ([`Backend::attend`](crate::Backend::attend), [`Backend::plan_chunks`](crate::Backend::plan_chunks)).
//! `append` is a copy with no arithmetic and runs here for every backend whose cache lives in
//! host memory.

pub(crate) mod append;
pub mod args;
pub mod cache;
pub(crate) mod compaction;
mod owned;
#[cfg(any(feature = "_cuda", feature = "ascend", feature = "ascend-emu"))]
pub(crate) mod tiles;

pub use append::append;
pub use args::{AttendArgs, AttendDims, AttendShape, ChunkArgs, ChunkRequest, SeqChunk};
pub use cache::{BlockTable, CacheDims, KvCache, KvCacheMut, PageLayout};
pub use compaction::{Scores, SelectArgs, Selection, compact, select as validate_select};
pub use owned::PagedCache;

/// Scratch a caller creates once and passes to every call of a serving loop, so that calls
/// allocate nothing in proportion to the cache (SPEC §7.6): buffers grow to the largest call's
/// needs and are reused after that.
///
/// The CPU backend runs on rayon's current pool: call inside `pool.install(..)` to use your own.
#[derive(Default)]
pub struct Workspace {
    /// Per page of the pool: the generation of the call that last claimed it for writing and the
    /// sequence that did (append's check that no page is written by two sequences).
    pub(crate) page_owner: Vec<(u32, u32)>,
    pub(crate) generation: u32,
    /// A backend's own scratch (the CPU's work list and per-thread tiles), kept between calls.
    pub(crate) scratch: Option<Box<dyn std::any::Any + Send>>,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("pages", &self.page_owner.len())
            .field("backend_scratch", &self.scratch.is_some())
            .finish()
    }
}

impl Workspace {
    /// An empty workspace; it grows on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.page_owner.capacity() * std::mem::size_of::<(u32, u32)>()
    }

    /// A fresh generation for a call that claims pages (wrapping resets the table).
    pub(crate) fn next_generation(&mut self, pages: usize) -> crate::Result<u32> {
        if self.page_owner.len() < pages {
            self.page_owner
                .try_reserve(pages - self.page_owner.len())
                .map_err(|e| crate::Error::Alloc { what: "the workspace's page table", detail: e.to_string() })?;
            self.page_owner.resize(pages, (0, 0));
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.page_owner.iter_mut().for_each(|o| *o = (0, 0));
            self.generation = 1;
        }
        Ok(self.generation)
    }
}
