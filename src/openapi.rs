//! The idempotency contract in an OpenAPI document (feature `utoipa`).
//!
//! The Idempotency-Key draft asks a resource to publish its idempotency
//! policy. For a Rust API that is its OpenAPI document:
//! [`IdempotencyLayer::openapi`](crate::IdempotencyLayer::openapi) describes
//! what the layer does, and [`IdempotencyOpenApi::apply`] writes it into
//! every operation the layer covers:
//!
//! - the `Idempotency-Key` header parameter, required or optional as
//!   configured, with its syntax and length;
//! - the `400`, `409`, `410`, `413`, `422` and `503` problem responses, with
//!   an `IdempotencyProblem` schema (RFC 9457) in the components, and
//!   `Retry-After` on `409` and `503`;
//! - the `Idempotent-Replayed` header on every success response;
//! - the expiry policy (how long a response is kept) in the operation's
//!   description.
//!
//! ```
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//! use utoipa::OpenApi;
//!
//! #[utoipa::path(post, path = "/orders", responses((status = 201, description = "The order")))]
//! async fn create_order() {}
//!
//! #[derive(OpenApi)]
//! #[openapi(paths(create_order))]
//! struct ApiDoc;
//!
//! let layer = IdempotencyLayer::new(MemoryStore::new()).with_require_key(true);
//! let mut doc = ApiDoc::openapi();
//! layer.openapi().apply(&mut doc);
//!
//! let post = doc.paths.get_path_item("/orders").unwrap().post.as_ref().unwrap();
//! assert!(post.parameters.as_ref().unwrap().iter().any(|p| p.name == "Idempotency-Key"));
//! assert!(post.responses.responses.contains_key("409"));
//! ```

use std::time::Duration;

use http::{HeaderName, Method};
use utoipa::openapi::content::Content;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::Response;
use utoipa::openapi::schema::{ObjectBuilder, Ref, Schema, SchemaFormat, Type};
use utoipa::openapi::{Components, OpenApi, RefOr, Required};

/// The name of the problem schema this module adds to the components.
pub const PROBLEM_SCHEMA: &str = "IdempotencyProblem";

/// The idempotency contract of one layer, ready to be written into an
/// OpenAPI document. Made by
/// [`IdempotencyLayer::openapi`](crate::IdempotencyLayer::openapi).
#[derive(Debug, Clone)]
pub struct IdempotencyOpenApi {
    pub(crate) methods: Vec<Method>,
    pub(crate) header: HeaderName,
    pub(crate) require_key: bool,
    pub(crate) min_key_len: usize,
    pub(crate) max_key_len: usize,
    pub(crate) ttl: Duration,
    pub(crate) replayed_header: Option<HeaderName>,
    pub(crate) type_base: String,
    pub(crate) paths: Option<Vec<String>>,
}

impl IdempotencyOpenApi {
    /// Writes the contract only into these paths (as the document spells
    /// them, such as `/orders/{id}`), for a layer that covers some routes
    /// only. By default every operation with a covered method gets it.
    #[must_use]
    pub fn only_paths<I, P>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.paths = Some(paths.into_iter().map(Into::into).collect());
        self
    }

    /// Writes the contract into every covered operation of `doc`, and the
    /// problem schema into its components. Responses the document already
    /// declares for a status are left as they are.
    pub fn apply(&self, doc: &mut OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            if self
                .paths
                .as_ref()
                .is_some_and(|only| !only.iter().any(|p| p == path))
            {
                continue;
            }
            for method in &self.methods {
                let operation = match *method {
                    Method::POST => item.post.as_mut(),
                    Method::PATCH => item.patch.as_mut(),
                    Method::PUT => item.put.as_mut(),
                    Method::DELETE => item.delete.as_mut(),
                    Method::GET => item.get.as_mut(),
                    _ => None,
                };
                if let Some(operation) = operation {
                    self.describe(operation);
                }
            }
        }
        let components = doc.components.get_or_insert_with(Components::new);
        components
            .schemas
            .entry(PROBLEM_SCHEMA.to_owned())
            .or_insert_with(|| problem_schema(&self.type_base).into());
    }

    fn describe(&self, operation: &mut Operation) {
        let name = canonical_case(self.header.as_str());
        let parameters = operation.parameters.get_or_insert_with(Vec::new);
        if !parameters
            .iter()
            .any(|p| p.name.eq_ignore_ascii_case(&name))
        {
            let description = format!(
                "A unique value for this operation, chosen by the client (a UUID, say), as an \
                 RFC 8941 sf-string (\"…\") or a bare token; {}–{} visible ASCII characters. \
                 A retry with the same key and the same request gets the first response \
                 again{}; the same key on a different request is refused (422).",
                self.min_key_len,
                self.max_key_len,
                if self.require_key {
                    ""
                } else {
                    ". Without the header the request is not idempotent"
                }
            );
            let parameter = ParameterBuilder::new()
                .name(name.clone())
                .parameter_in(ParameterIn::Header)
                .required(if self.require_key {
                    Required::True
                } else {
                    Required::False
                })
                .description(Some(description))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(self.min_key_len))
                        .max_length(Some(self.max_key_len)),
                ))
                .example(Some("\"8e03978e-40d5-43e8-bc93-6894a57f9324\"".into()))
                .build();
            parameters.push(parameter);
        }

        if let Some(replayed) = &self.replayed_header {
            for (status, response) in operation.responses.responses.iter_mut() {
                if let (true, RefOr::T(response)) = (status.starts_with('2'), response) {
                    let mut header = Header::new(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(["true"])),
                    );
                    header.description = Some(
                        "`true` when this is the recorded response of an earlier request with \
                         the same Idempotency-Key, replayed; absent on the first execution."
                            .to_owned(),
                    );
                    response
                        .headers
                        .entry(canonical_case(replayed.as_str()))
                        .or_insert(header);
                }
            }
        }

        for (status, description, retry_after) in [
            (
                "400",
                "The Idempotency-Key is missing (where required) or malformed, or the request body could not be read.",
                false,
            ),
            (
                "409",
                "A request with this Idempotency-Key is still being processed. Retry after Retry-After seconds with the same key.",
                true,
            ),
            (
                "410",
                "The request with this Idempotency-Key completed, but its response was too large to keep. It will not run again.",
                false,
            ),
            (
                "413",
                "The request body is larger than the layer reads for a request with an Idempotency-Key.",
                false,
            ),
            (
                "422",
                "This Idempotency-Key was already used for a different request (method, path or body). Use a new key for a new request.",
                false,
            ),
            (
                "503",
                "The idempotency store is unavailable, so the request was not processed. Retry after Retry-After seconds with the same key.",
                true,
            ),
        ] {
            operation
                .responses
                .responses
                .entry(status.to_owned())
                .or_insert_with(|| problem_response(description, retry_after).into());
        }

        let policy = format!(
            "Idempotency: requests with an Idempotency-Key header run once; the response is \
             recorded for {} and every retry with the same key and the same request gets it \
             again{}. Errors are application/problem+json ({PROBLEM_SCHEMA}).",
            human(self.ttl),
            self.replayed_header
                .as_ref()
                .map(|h| format!(", marked with `{}: true`", canonical_case(h.as_str())))
                .unwrap_or_default()
        );
        operation.description = Some(match operation.description.take() {
            Some(own) if !own.is_empty() => format!("{own}\n\n{policy}"),
            _ => policy,
        });
    }
}

impl utoipa::Modify for IdempotencyOpenApi {
    fn modify(&self, openapi: &mut OpenApi) {
        self.apply(openapi);
    }
}

fn problem_response(description: &str, retry_after: bool) -> Response {
    let mut response = Response::new(description);
    response.content.insert(
        "application/problem+json".to_owned(),
        Content::new(Some(Ref::from_schema_name(PROBLEM_SCHEMA))),
    );
    if retry_after {
        let mut header = Header::new(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1)),
        );
        header.description = Some("Seconds to wait before retrying.".to_owned());
        response.headers.insert("Retry-After".to_owned(), header);
    }
    response
}

fn problem_schema(type_base: &str) -> Schema {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "An RFC 9457 problem document, as the idempotency layer answers its own rejections.",
        ))
        .property(
            "type",
            string()
                .format(Some(SchemaFormat::Custom("uri".to_owned())))
                .description(Some(format!(
                    "The problem type: {type_base} followed by key-missing, key-invalid, \
                     body-unreadable, request-in-flight, response-not-stored, body-too-large, \
                     key-reused, handler-panicked or store-unavailable."
                ))),
        )
        .required("type")
        .property(
            "title",
            string().description(Some("The same for every occurrence of a type.")),
        )
        .required("title")
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .description(Some("The HTTP status.")),
        )
        .required("status")
        .property(
            "detail",
            string().description(Some("This occurrence explained.")),
        )
        .required("detail")
        .property(
            "instance",
            string().description(Some(
                "A urn:uuid naming this occurrence; the server's log carries it too.",
            )),
        )
        .property(
            "retryable",
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .description(Some(
                    "Whether the same request with the same key may succeed later (409, 503).",
                )),
        )
        .property(
            "original_status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .description(Some(
                    "410 only: the status of the response that was not kept.",
                )),
        )
        .into()
}

/// `idempotency-key` as `Idempotency-Key`, as documents spell headers.
fn canonical_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// `86400 s` as `24 hours (86400 seconds)`.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    let (n, unit) = match secs {
        s if s % 86_400 == 0 && s >= 86_400 => (s / 86_400, "day"),
        s if s % 3_600 == 0 && s >= 3_600 => (s / 3_600, "hour"),
        s if s % 60 == 0 && s >= 60 => (s / 60, "minute"),
        s => (s, "second"),
    };
    let plural = if n == 1 { "" } else { "s" };
    format!("{n} {unit}{plural} ({secs} seconds)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_durations_read_well() {
        assert_eq!(canonical_case("idempotency-key"), "Idempotency-Key");
        assert_eq!(canonical_case("idempotent-replayed"), "Idempotent-Replayed");
        assert_eq!(human(Duration::from_secs(86_400)), "1 day (86400 seconds)");
        assert_eq!(human(Duration::from_secs(7_200)), "2 hours (7200 seconds)");
        assert_eq!(human(Duration::from_secs(90)), "90 seconds (90 seconds)");
        assert_eq!(
            human(Duration::from_secs(21 * 3600)),
            "21 hours (75600 seconds)"
        );
    }

    #[test]
    fn the_layer_describes_its_own_settings() {
        use crate::problem::ProblemDocs;
        use crate::{IdempotencyLayer, MemoryStore};
        let contract = IdempotencyLayer::new(MemoryStore::new())
            .with_key_length(8, 64)
            .with_ttl(Duration::from_secs(3600))
            .with_problems(ProblemDocs::new().with_type_base("https://api.example.com/p/"))
            .openapi();
        assert_eq!((contract.min_key_len, contract.max_key_len), (8, 64));
        assert_eq!(contract.ttl, Duration::from_secs(3600));
        assert!(!contract.require_key);
        let schema = serde_json::to_value(problem_schema(&contract.type_base)).unwrap();
        assert!(
            schema["properties"]["type"]["description"]
                .as_str()
                .unwrap()
                .contains("https://api.example.com/p/")
        );
    }
}
