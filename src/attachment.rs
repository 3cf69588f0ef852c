//! [`Attachment`]: request-scoped state a store hands the handler.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// Request-scoped state that a store hands the handler once the lock is
/// taken, such as the open transaction of
/// [`TransactionalPostgresStore`](crate::store::postgres::TransactionalPostgresStore).
///
/// It is transport-neutral: a store builds it from any cloneable value,
/// and each face delivers it its own way. The HTTP layer inserts the value
/// itself into the request's extensions (so an axum handler extracts
/// `Extension<T>`); the message face passes the `Attachment` to the handler,
/// which reads it with [`get`](Self::get).
///
/// ```
/// use tower_idempotency::store::Attachment;
///
/// #[derive(Clone, Debug, PartialEq)]
/// struct Tenant(&'static str);
///
/// let attachment = Attachment::new(Tenant("acme"));
/// assert_eq!(attachment.get::<Tenant>(), Some(&Tenant("acme")));
/// assert_eq!(attachment.get::<String>(), None);
/// ```
#[derive(Clone)]
pub struct Attachment {
    value: Arc<dyn Any + Send + Sync>,
    type_name: &'static str,
    /// Inserts a clone of the value, under its own type, into a request's
    /// extensions: chosen where the type is known.
    insert: fn(&(dyn Any + Send + Sync), &mut http::Extensions),
}

impl Attachment {
    /// Wraps `value`.
    pub fn new<T: Clone + Send + Sync + 'static>(value: T) -> Self {
        Self {
            value: Arc::new(value),
            type_name: std::any::type_name::<T>(),
            insert: insert_typed::<T>,
        }
    }

    /// The value, if it is a `T`.
    pub fn get<T: 'static>(&self) -> Option<&T> {
        self.value.downcast_ref()
    }

    /// Puts a clone of the value into `extensions`, under its own type.
    pub(crate) fn insert_into(&self, extensions: &mut http::Extensions) {
        (self.insert)(&*self.value, extensions);
    }
}

fn insert_typed<T: Clone + Send + Sync + 'static>(
    value: &(dyn Any + Send + Sync),
    extensions: &mut http::Extensions,
) {
    if let Some(value) = value.downcast_ref::<T>() {
        extensions.insert(value.clone());
    }
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Attachment").field(&self.type_name).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Handle(u32);

    #[test]
    fn inserts_the_value_under_its_own_type() {
        let attachment = Attachment::new(Handle(7));
        let mut ext = http::Extensions::new();
        attachment.insert_into(&mut ext);
        assert_eq!(ext.get::<Handle>(), Some(&Handle(7)));
        assert!(ext.get::<Attachment>().is_none());
        assert!(format!("{attachment:?}").contains("Handle"));
    }
}
