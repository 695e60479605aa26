//! STUB: replaced by the image-reader work. A byte-budgeted LRU shared by all images.

pub struct BlockCache {
    pub budget: usize,
}

impl BlockCache {
    pub fn new(budget_bytes: usize) -> Self {
        BlockCache {
            budget: budget_bytes,
        }
    }
}
