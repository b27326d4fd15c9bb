//! Which handler runs for which event type.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use events::EventData;

use crate::{Context, Handle, HandleError};

/// A handler with its event type erased, so one map holds them all.
#[async_trait::async_trait]
pub(crate) trait ErasedHandler: Send + Sync {
    async fn call(&self, ctx: &mut Context<'_>) -> Result<(), HandleError>;
}

struct Typed<E, H> {
    handler: H,
    _event: PhantomData<fn() -> E>,
}

#[async_trait::async_trait]
impl<E: EventData, H: Handle<E>> ErasedHandler for Typed<E, H> {
    async fn call(&self, ctx: &mut Context<'_>) -> Result<(), HandleError> {
        // The codec validated `data` against E's shape already; a failure
        // here means the catalog and the handler disagree: permanent.
        let data = ctx.event.data_as::<E>().map_err(HandleError::permanent)?;
        self.handler.handle(ctx, data).await
    }
}

/// The handlers of one service, by event type.
#[derive(Clone)]
pub struct Router {
    service: String,
    handlers: HashMap<&'static str, Arc<dyn ErasedHandler>>,
}

impl Router {
    /// An empty router for `service` (its queue, schema and source name).
    pub fn new(service: impl Into<String>) -> Self {
        Router {
            service: service.into(),
            handlers: HashMap::new(),
        }
    }

    /// Registers `handler` for events of type `E`; one handler per type.
    pub fn on<E: EventData, H: Handle<E>>(mut self, handler: H) -> Self {
        self.handlers.insert(
            E::TYPE,
            Arc::new(Typed {
                handler,
                _event: PhantomData,
            }),
        );
        self
    }

    /// The service this router belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The event types with a handler.
    pub fn handled_types(&self) -> Vec<&'static str> {
        let mut t: Vec<_> = self.handlers.keys().copied().collect();
        t.sort();
        t
    }

    pub(crate) fn handler(&self, event_type: &str) -> Option<&Arc<dyn ErasedHandler>> {
        self.handlers.get(event_type)
    }
}
