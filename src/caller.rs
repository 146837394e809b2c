//! Who a request turned out to be, for the access log: the authenticated key's id (or
//! `admin`) and its vault, noted by authentication and read by the HTTP layer when it answers.
//! Never a secret: the key id is the public half of a key, as the audit log names it.

use std::cell::RefCell;
use std::future::Future;

#[derive(Clone, Debug, Default)]
pub struct Caller {
    pub key_id: Option<String>,
    pub vault: Option<String>,
}

tokio::task_local! {
    static CALLER: RefCell<Caller>;
}

/// Runs a request's future with a place to note its caller; the caller it noted.
pub async fn scope<F: Future>(future: F) -> (F::Output, Caller) {
    CALLER
        .scope(RefCell::new(Caller::default()), async move {
            let output = future.await;
            let caller = CALLER.with(|caller| caller.borrow().clone());
            (output, caller)
        })
        .await
}

/// Notes the authenticated caller (no-op outside a request).
pub fn note(key_id: &str, vault: Option<String>) {
    let _ = CALLER.try_with(|caller| {
        *caller.borrow_mut() = Caller {
            key_id: Some(key_id.to_owned()),
            vault,
        };
    });
}
