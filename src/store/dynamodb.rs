//! [`DynamoDbStore`]: records in an Amazon DynamoDB table, shared by every
//! instance of the application, one request per step.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//! use tower_idempotency::store::dynamodb::{Client, DynamoDbStore};
//!
//! async fn create_payment() -> &'static str {
//!     "charged once"
//! }
//!
//! # async fn run(client: Client) -> Result<(), Box<dyn std::error::Error>> {
//! // `client` is the application's own, built from its AWS configuration.
//! let store = DynamoDbStore::new(client, "idempotency");
//! store.create_table().await?; // if missing: on-demand billing, TTL on expires_at
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(store));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! The store is built on the official `aws-sdk-dynamodb` crate, re-exported
//! as [`sdk`] so the versions always match. The application hands it a
//! configured [`Client`] (region, credentials, endpoint, HTTP client): the
//! store adds no AWS configuration loader of its own.
//!
//! # Table
//!
//! One item per idempotency key, in a table whose partition key is the
//! string attribute `pk`. [`create_table`](DynamoDbStore::create_table)
//! creates it with on-demand billing and turns on TTL for `expires_at`;
//! applications that manage tables elsewhere declare the same. In
//! CloudFormation:
//!
//! ```yaml
//! IdempotencyTable:
//!   Type: AWS::DynamoDB::Table
//!   Properties:
//!     TableName: idempotency
//!     BillingMode: PAY_PER_REQUEST
//!     AttributeDefinitions:
//!       - { AttributeName: pk, AttributeType: S }
//!     KeySchema:
//!       - { AttributeName: pk, KeyType: HASH }
//!     TimeToLiveSpecification:
//!       AttributeName: expires_at
//!       Enabled: true
//! ```
//!
//! In Terraform:
//!
//! ```hcl
//! resource "aws_dynamodb_table" "idempotency" {
//!   name         = "idempotency"
//!   billing_mode = "PAY_PER_REQUEST"
//!   hash_key     = "pk"
//!
//!   attribute {
//!     name = "pk"
//!     type = "S"
//!   }
//!
//!   ttl {
//!     attribute_name = "expires_at"
//!     enabled        = true
//!   }
//! }
//! ```
//!
//! The store needs `dynamodb:PutItem`, `dynamodb:UpdateItem`,
//! `dynamodb:DeleteItem` and `dynamodb:GetItem` (the last only for layers
//! that wait on an in-flight request) on the table;
//! [`create_table`](DynamoDbStore::create_table) also needs
//! `dynamodb:DescribeTable`, `dynamodb:CreateTable`,
//! `dynamodb:DescribeTimeToLive` and `dynamodb:UpdateTimeToLive`.
//!
//! Each item holds:
//!
//! | attribute | type | holds |
//! |---|---|---|
//! | `pk` | S | the prefix (default `idempotency:`) and the 64 hex digits of the [`StoreKey`]: never the client's key |
//! | `token` | B | the lock token (16 bytes) of the holder, kept once completed |
//! | `fingerprint` | B | the request's fingerprint (32 bytes) |
//! | `record` | B | the [`Record::encode`] bytes, once completed |
//! | `expires_at_ms` | N | the lease end in flight, the ttl end once completed, in Unix milliseconds: the one the store compares |
//! | `expires_at` | N | the same in Unix seconds, rounded up, plus the clock-skew margin: the table's TTL attribute |
//!
//! # One request per step
//!
//! - `begin` is one conditional `PutItem` of an in-flight item,
//!   `attribute_not_exists(pk) OR expires_at_ms <= :now`, with
//!   `ReturnValuesOnConditionCheckFailure = ALL_OLD`: when the condition
//!   fails, the same answer carries the live item, the holder's lock or the
//!   completed record, and no second read is needed.
//! - `complete` is one `UpdateItem` that writes the record and the ttl;
//!   `release` one `DeleteItem`; `extend` one `UpdateItem` of the lease end.
//!   Each is conditioned on the lock token, on the item being in flight and
//!   on a live lease (fencing).
//!
//! A request that runs its handler costs two requests (`PutItem`, then
//! `UpdateItem` to record or `DeleteItem` to release), plus one
//! `UpdateItem` per heartbeat while a handler outlives a third of its
//! lease; a replay, a conflict or a fingerprint mismatch costs one
//! `PutItem`. In capacity units (on-demand or provisioned alike, a write
//! is 1 WCU per KB of the larger of the item before and after, a
//! conditional write that fails included): the first execution costs
//! 1 WCU for the lock and 1 WCU per started KB of the recorded item; a
//! replay, conflict or mismatch 1 WCU per started KB of the item it finds.
//! [`Store::wait`] polls with `GetItem` (0.5 RCU per 4 KB, or 1 RCU with
//! [`with_consistent_reads`](DynamoDbStore::with_consistent_reads), the
//! default) for layers that wait on an in-flight request instead of
//! answering 409.
//!
//! # Expiry and clocks
//!
//! DynamoDB has no clock a condition can read, and its TTL deletes expired
//! items lazily, often days later. So the store checks expiry itself on
//! every step, from `expires_at_ms`, with the caller's clock: an item past
//! its expiry is treated as absent (taken over by the next `begin`,
//! refused to `complete`, `release` and `extend`) whether or not TTL has
//! deleted it yet.
//!
//! Instances whose clocks disagree therefore disagree on when a lease
//! ends. An instance whose clock runs `d` ahead of the holder's sees the
//! holder's lock expire `d` early and may take the key over while the
//! holder still runs: the holder's `complete` is then refused (the token
//! fences it), but the request ran twice. Keep clocks synchronized (NTP;
//! AWS compute has it built in), keep leases far longer than any skew, and
//! set [`with_clock_skew_margin`](DynamoDbStore::with_clock_skew_margin)
//! to the largest skew expected: a lock or record then counts as expired
//! only once its end is that far in the past. The margin delays the
//! takeover of abandoned locks and keeps records that much longer; it is
//! zero by default.
//!
//! # Item size
//!
//! An item holds at most 400 KB (409,600 bytes), attribute names included.
//! The store declares the largest record it can keep in its
//! [`Capabilities`] (the item limit less the other attributes), and the
//! HTTP layer records a response that would not fit as a tombstone: the
//! client gets its response, retries get `410 Gone`, and the request never
//! runs twice. [`with_max_item_size`](DynamoDbStore::with_max_item_size)
//! sets the limit for a DynamoDB-compatible server with another one.
//!
//! # Timeouts and errors
//!
//! Every call is bounded by [`with_timeout`](DynamoDbStore::with_timeout)
//! (1 second by default), twice over: the store runs the SDK with an
//! operation timeout of that bound (and an attempt timeout no longer than
//! it), so the SDK's own retries of throttling and server errors happen
//! within it, and the store also wraps every call in a timer of its own,
//! whatever the client's configuration. The client's retry mode and
//! attempt count are kept; its longer timeouts are cut to the bound.
//!
//! Past the bound a call fails with [`StoreError::Timeout`]. Throttling,
//! server errors and network failures are [`StoreError::Unavailable`], a
//! record that does not decode [`StoreError::Corrupt`], anything else
//! (a missing table, denied access) [`StoreError::Backend`]; the layer
//! answers each with 503 and `Retry-After`. The client reconnects by
//! itself: no store needs rebuilding after an outage.
//!
//! A `begin` whose answer is lost (a timeout after DynamoDB may have
//! written the lock, a cancelled request) does not strand its lock: the
//! request runs on a task of its own, which releases the lock under the
//! attempt's own token once it learns the lock was taken and nobody took
//! the answer, or, when the outcome is unknown, releases it anyway
//! (fenced, so it can only free this attempt's lock).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
    TimeToLiveStatus,
};
use bytes::Bytes;

/// The `aws-sdk-dynamodb` crate this store is built on, so that an
/// application builds its [`Client`] with the matching version.
pub use aws_sdk_dynamodb as sdk;
pub use aws_sdk_dynamodb::Client;

use super::{
    Begin, Capabilities, DEFAULT_TIMEOUT, LockToken, MAX_EXPIRY, Store, StoreError, StoreKey,
    release_unanswered,
};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

const DEFAULT_PREFIX: &str = "idempotency:";
/// DynamoDB's item limit: 400 KB, attribute names included.
const DEFAULT_MAX_ITEM_SIZE: usize = 400 * 1024;
/// The least bound on [`DynamoDbStore::create_table`], which waits for
/// the table to become active.
const MAINTENANCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`Store::wait`] looks at the item.
const WAIT_POLL: Duration = Duration::from_millis(50);

const PK: &str = "pk";
const TOKEN: &str = "token";
const FINGERPRINT: &str = "fingerprint";
const RECORD: &str = "record";
const EXPIRES_AT: &str = "expires_at";
const EXPIRES_AT_MS: &str = "expires_at_ms";

/// What an item holds besides the record, in DynamoDB's item-size
/// accounting: every attribute name, the key's 64 hex digits (the prefix
/// comes on top), the token and fingerprint, and two numbers of at most
/// 21 bytes each. A few bytes of slack on top.
const ITEM_OVERHEAD: usize = PK.len()
    + TOKEN.len()
    + FINGERPRINT.len()
    + RECORD.len()
    + EXPIRES_AT.len()
    + EXPIRES_AT_MS.len()
    + 64
    + 16
    + 32
    + 2 * 21
    + 16;

/// The begin condition: no item, or one whose expiry has passed.
const BEGIN_CONDITION: &str = "attribute_not_exists(#pk) OR #exms <= :cutoff";
/// The fence of `complete`, `release` and `extend`: the caller's token, in
/// flight, within its lease.
const FENCE: &str = "#tok = :tok AND attribute_not_exists(#rec) AND #exms > :cutoff";

/// A record larger than the store's item can hold; see
/// [`DynamoDbStore::max_record_size`]. It reaches the caller of
/// [`complete`](Store::complete) as [`StoreError::Backend`] and can be
/// recovered with `downcast_ref`. The HTTP layer never sends one: it
/// records a tombstone instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an idempotency record of {size} bytes exceeds the {limit} bytes a DynamoDB item holds")]
pub struct RecordTooLarge {
    size: usize,
    limit: usize,
}

impl RecordTooLarge {
    /// The encoded record's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The largest record the store holds.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// A [`Store`] in an Amazon DynamoDB table (or a DynamoDB-compatible
/// server), through the application's [`Client`].
///
/// Records are shared by every process that uses the same table and
/// prefix. Cloning is cheap and shares the client. See the
/// [module docs](self) for the table, the cost per request and an example.
#[derive(Clone)]
pub struct DynamoDbStore {
    /// The client as the application handed it over.
    source: Client,
    /// The same client, with its timeouts cut to `timeout`.
    client: Client,
    table: Arc<str>,
    prefix: Arc<str>,
    timeout: Duration,
    consistent_reads: bool,
    skew_margin: Duration,
    max_item_size: usize,
}

impl fmt::Debug for DynamoDbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client is left out: its configuration holds credentials.
        f.debug_struct("DynamoDbStore")
            .field("table", &self.table)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("consistent_reads", &self.consistent_reads)
            .field("clock_skew_margin", &self.skew_margin)
            .field("max_item_size", &self.max_item_size)
            .finish_non_exhaustive()
    }
}

impl DynamoDbStore {
    /// A store in `table` through `client`, with the prefix `idempotency:`,
    /// a 1 second bound on every call, consistent reads, no clock-skew
    /// margin, and DynamoDB's 400 KB item limit.
    ///
    /// Nothing is created yet: call [`create_table`](Self::create_table)
    /// once, or declare the table as the [module docs](self) show.
    ///
    /// The client needs a Tokio sleep implementation for its timeouts, as
    /// any client built from `aws-config` or with the SDK's default
    /// features has.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        let table: String = table.into();
        Self {
            client: with_sdk_timeouts(&client, DEFAULT_TIMEOUT),
            source: client,
            table: table.into(),
            prefix: DEFAULT_PREFIX.into(),
            timeout: DEFAULT_TIMEOUT,
            consistent_reads: true,
            skew_margin: Duration::ZERO,
            max_item_size: DEFAULT_MAX_ITEM_SIZE,
        }
    }

    /// Starts every partition key with `prefix` (default `idempotency:`),
    /// so that several applications or scopes can share one table.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix: String = prefix.into();
        self.prefix = prefix.into();
        self
    }

    /// Bounds every call (default 1 second), the SDK's retries included.
    /// Past the bound a call fails with [`StoreError::Timeout`].
    ///
    /// Keep it below the layer's
    /// [`with_store_timeout`](crate::IdempotencyLayer::with_store_timeout)
    /// so the store reports its own error first.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.client = with_sdk_timeouts(&self.source, timeout);
        self
    }

    /// Whether [`Store::wait`] reads the item with strongly consistent
    /// reads (default `true`). Eventually consistent reads cost half as
    /// much and may see a change late. No other step reads: `begin` learns
    /// the current item from its own conditional write.
    #[must_use]
    pub fn with_consistent_reads(mut self, yes: bool) -> Self {
        self.consistent_reads = yes;
        self
    }

    /// Counts a lock or record as expired only once its end is `margin` in
    /// the past by this instance's clock (default zero); see "Expiry and
    /// clocks" in the [module docs](self). Set it to the largest clock
    /// skew expected between instances.
    #[must_use]
    pub fn with_clock_skew_margin(mut self, margin: Duration) -> Self {
        self.skew_margin = margin.min(MAX_EXPIRY);
        self
    }

    /// The largest item, in bytes, the table takes (default 409,600,
    /// DynamoDB's 400 KB). For DynamoDB-compatible servers with another
    /// limit.
    #[must_use]
    pub fn with_max_item_size(mut self, bytes: usize) -> Self {
        self.max_item_size = bytes;
        self
    }

    /// The client the store runs on, with its timeouts cut to the store's
    /// bound.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The prefix of every partition key the store writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on every call, as [`with_timeout`](Self::with_timeout)
    /// set it (1 second by default).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The largest record, in [`Record::encode`] bytes, an item holds:
    /// the item limit less the other attributes. Declared in the store's
    /// [`Capabilities`].
    pub fn max_record_size(&self) -> usize {
        self.max_item_size
            .saturating_sub(ITEM_OVERHEAD + self.prefix.len())
    }

    /// The partition key of `key`'s item: the prefix and 64 hex digits.
    pub fn partition_key(&self, key: &StoreKey) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 64);
        out.push_str(&self.prefix);
        out.push_str(&key.to_hex());
        out
    }

    /// Creates the table if it is missing (partition key `pk`, a string;
    /// on-demand billing), waits until it is active, and turns on TTL for
    /// `expires_at` if it is off.
    ///
    /// Safe to call from every instance at start-up: an existing table is
    /// only described (a table with another key schema is an error), and a
    /// table another instance is creating is waited for. Bounded by 60
    /// seconds or [`with_timeout`](Self::with_timeout), whichever is
    /// longer; every request within by the latter.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let limit = self.timeout.max(MAINTENANCE_TIMEOUT);
        match tokio::time::timeout(limit, self.create_table_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }

    async fn create_table_unbounded(&self) -> Result<(), StoreError> {
        let table = &*self.table;
        if self.describe_key_schema().await?.is_none() {
            let created = self
                .bounded(
                    self.client
                        .create_table()
                        .table_name(table)
                        .billing_mode(BillingMode::PayPerRequest)
                        .attribute_definitions(
                            AttributeDefinition::builder()
                                .attribute_name(PK)
                                .attribute_type(ScalarAttributeType::S)
                                .build()
                                .map_err(StoreError::backend)?,
                        )
                        .key_schema(
                            KeySchemaElement::builder()
                                .attribute_name(PK)
                                .key_type(KeyType::Hash)
                                .build()
                                .map_err(StoreError::backend)?,
                        )
                        .send(),
                )
                .await?;
            match created {
                Ok(_) => tracing::info!(table, "created the idempotency table"),
                // Another instance created it meanwhile.
                Err(e) if e.code() == Some("ResourceInUseException") => {}
                Err(e) => return Err(classify("CreateTable", e, self.timeout)),
            }
        }
        // Wait until the table is active.
        loop {
            let described = self
                .bounded(self.client.describe_table().table_name(table).send())
                .await?
                .map_err(|e| classify("DescribeTable", e, self.timeout))?;
            let status = described.table().and_then(|t| t.table_status());
            if status == Some(&TableStatus::Active) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ttl = self
            .bounded(self.client.describe_time_to_live().table_name(table).send())
            .await?
            .map_err(|e| classify("DescribeTimeToLive", e, self.timeout))?;
        let ttl = ttl.time_to_live_description();
        let status = ttl.and_then(|d| d.time_to_live_status());
        let attribute = ttl.and_then(|d| d.attribute_name());
        match status {
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling) => {
                if attribute.is_some_and(|a| a != EXPIRES_AT) {
                    tracing::warn!(
                        table,
                        "the table's TTL is on another attribute than expires_at: expired idempotency items are not deleted"
                    );
                }
                Ok(())
            }
            _ => {
                let spec = TimeToLiveSpecification::builder()
                    .attribute_name(EXPIRES_AT)
                    .enabled(true)
                    .build()
                    .map_err(StoreError::backend)?;
                let updated = self
                    .bounded(
                        self.client
                            .update_time_to_live()
                            .table_name(table)
                            .time_to_live_specification(spec)
                            .send(),
                    )
                    .await?;
                match updated {
                    Ok(_) => Ok(()),
                    // Another instance turned it on meanwhile.
                    Err(e)
                        if e.code() == Some("ValidationException")
                            && e.message().is_some_and(|m| m.contains("already enabled")) =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(classify("UpdateTimeToLive", e, self.timeout)),
                }
            }
        }
    }

    /// `Some(true)` if the table exists with `pk` as its only key,
    /// `None` if it does not exist; another key schema is an error.
    async fn describe_key_schema(&self) -> Result<Option<bool>, StoreError> {
        let described = self
            .bounded(self.client.describe_table().table_name(&*self.table).send())
            .await?;
        let out = match described {
            Ok(out) => out,
            Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(None),
            Err(e) => return Err(classify("DescribeTable", e, self.timeout)),
        };
        let keys = out.table().map(|t| t.key_schema()).unwrap_or_default();
        let ours = keys.len() == 1
            && keys[0].attribute_name() == PK
            && keys[0].key_type() == &KeyType::Hash;
        if ours {
            Ok(Some(true))
        } else {
            Err(StoreError::backend(format!(
                "the table {} exists with another key schema than a string partition key named pk",
                self.table
            )))
        }
    }

    /// Runs `op` within the store's bound.
    async fn bounded<T>(&self, op: impl Future<Output = T>) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, op)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))
    }

    /// The cutoff for "expired": now less the clock-skew margin.
    fn cutoff(&self) -> AttributeValue {
        number(crate::util::unix_millis().saturating_sub(millis(self.skew_margin)))
    }

    /// The two expiry attributes for an end `d` from now.
    fn expiry(&self, d: Duration) -> (AttributeValue, AttributeValue) {
        let end_ms = crate::util::unix_millis().saturating_add(millis(d));
        let ttl_secs = end_ms
            .saturating_add(millis(self.skew_margin))
            .div_ceil(1000);
        (number(ttl_secs), number(end_ms))
    }

    /// An `UpdateItem` of the key's item, fenced by `token` ([`FENCE`]),
    /// with `:exp` and `:exms` the expiry `d` from now (`#exp`, `#exms`
    /// named): the caller adds the update expression and what else it
    /// sets.
    fn fenced_update(
        &self,
        key: &StoreKey,
        token: &LockToken,
        d: Duration,
    ) -> UpdateItemFluentBuilder {
        let (ttl, end_ms) = self.expiry(d);
        self.client
            .update_item()
            .table_name(&*self.table)
            .key(PK, AttributeValue::S(self.partition_key(key)))
            .condition_expression(FENCE)
            .expression_attribute_names("#tok", TOKEN)
            .expression_attribute_names("#rec", RECORD)
            .expression_attribute_names("#exp", EXPIRES_AT)
            .expression_attribute_names("#exms", EXPIRES_AT_MS)
            .expression_attribute_values(":tok", token_value(token))
            .expression_attribute_values(":exp", ttl)
            .expression_attribute_values(":exms", end_ms)
            .expression_attribute_values(":cutoff", self.cutoff())
    }

    /// One conditional write: `None` if it applied, else the item its
    /// condition failed on (empty if the server returned none).
    /// `conditional_failed` picks the operation's condition failure out of
    /// its errors.
    async fn conditional<E, O>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<O, SdkError<E, HttpResponse>>>,
        conditional_failed: impl FnOnce(E) -> Result<Option<HashMap<String, AttributeValue>>, Box<E>>,
    ) -> Result<Option<HashMap<String, AttributeValue>>, Failure>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let Ok(answer) = tokio::time::timeout(self.timeout, call).await else {
            return Err(Failure {
                error: StoreError::Timeout(self.timeout),
                maybe_applied: true,
            });
        };
        match answer {
            Ok(_) => Ok(None),
            Err(SdkError::ServiceError(service)) => {
                let status = service.raw().status().as_u16();
                match conditional_failed(service.into_err()) {
                    Ok(old) => Ok(Some(old.unwrap_or_default())),
                    Err(e) => Err(Failure {
                        error: map_service_err(op, *e, status),
                        maybe_applied: status >= 500,
                    }),
                }
            }
            Err(e) => Err(Failure {
                maybe_applied: maybe_applied(&e),
                error: classify(op, e, self.timeout),
            }),
        }
    }
}

/// The item an `UpdateItem`'s failed condition found, or the error that
/// was not a failed condition.
fn update_condition_failed(
    e: UpdateItemError,
) -> Result<Option<HashMap<String, AttributeValue>>, Box<UpdateItemError>> {
    match e {
        UpdateItemError::ConditionalCheckFailedException(e) => Ok(e.item),
        other => Err(Box::new(other)),
    }
}

/// `client` with an operation timeout of `timeout` and an attempt timeout
/// no longer than it, everything else as configured.
fn with_sdk_timeouts(client: &Client, timeout: Duration) -> Client {
    let config = client.config();
    let user = config.timeout_config();
    let attempt = user
        .and_then(TimeoutConfig::operation_attempt_timeout)
        .map_or(timeout, |t| t.min(timeout));
    let mut timeouts = user
        .map(TimeoutConfig::to_builder)
        .unwrap_or_else(TimeoutConfig::builder)
        .operation_timeout(timeout)
        .operation_attempt_timeout(attempt);
    if let Some(connect) = user.and_then(TimeoutConfig::connect_timeout) {
        timeouts = timeouts.connect_timeout(connect.min(timeout));
    }
    let config = config.to_builder().timeout_config(timeouts.build()).build();
    Client::from_conf(config)
}

/// Milliseconds, capped at about 1000 years.
fn millis(d: Duration) -> u64 {
    crate::util::millis(d.min(MAX_EXPIRY))
}

fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn blob(bytes: impl Into<Vec<u8>>) -> AttributeValue {
    AttributeValue::B(Blob::new(bytes))
}

fn token_value(token: &LockToken) -> AttributeValue {
    blob(token.to_bytes().to_vec())
}

fn malformed(what: &'static str) -> StoreError {
    StoreError::backend(format!("malformed idempotency item: {what}"))
}

/// The binary attribute `name` of `item`, if it has one.
fn binary<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a [u8]> {
    match item.get(name) {
        Some(AttributeValue::B(b)) => Some(b.as_ref()),
        _ => None,
    }
}

/// Whether `item` is held under `token`.
fn held_by(item: &HashMap<String, AttributeValue>, token: &LockToken) -> bool {
    binary(item, TOKEN).is_some_and(|t| t == token.to_bytes())
}

/// The live item a `begin` found: in flight, or completed.
fn live_item(mut item: HashMap<String, AttributeValue>) -> Result<Begin, StoreError> {
    if let Some(record) = item.remove(RECORD) {
        let AttributeValue::B(record) = record else {
            return Err(malformed("record is not binary"));
        };
        return Ok(Begin::Completed(Record::decode_bytes(Bytes::from(
            record.into_inner(),
        ))?));
    }
    let fingerprint = binary(&item, FINGERPRINT)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| malformed("fingerprint is not 32 bytes"))?;
    Ok(Begin::InFlight {
        fingerprint: Some(Fingerprint::from_bytes(fingerprint)),
    })
}

/// Service error codes that mean DynamoDB cannot serve now, rather than
/// that the request is wrong.
fn is_transient(code: Option<&str>, status: u16) -> bool {
    status >= 500
        || status == 429
        || matches!(
            code,
            Some(
                "ProvisionedThroughputExceededException"
                    | "RequestLimitExceeded"
                    | "ThrottlingException"
                    | "Throttling"
                    | "LimitExceededException"
                    | "InternalServerError"
                    | "InternalFailure"
                    | "ServiceUnavailable"
                    | "TransactionConflictException"
                    | "ReplicatedWriteConflictException"
            )
        )
}

/// A service error the caller did not handle itself.
fn map_service_err<E>(op: &'static str, err: E, status: u16) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let message = format!("DynamoDB {op}: {}", DisplayErrorContext(&err));
    if is_transient(err.code(), status) {
        StoreError::unavailable(message)
    } else {
        StoreError::backend(message)
    }
}

/// Network failures, timeouts, throttling and server errors are
/// `Unavailable` (or `Timeout`); everything else `Backend`.
fn classify<E>(op: &'static str, err: SdkError<E, HttpResponse>, timeout: Duration) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match err {
        SdkError::TimeoutError(_) => StoreError::Timeout(timeout),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            map_service_err(op, service.into_err(), status)
        }
        SdkError::ConstructionFailure(_) => {
            StoreError::backend(format!("DynamoDB {op}: {}", DisplayErrorContext(&err)))
        }
        other => StoreError::unavailable(format!("DynamoDB {op}: {}", DisplayErrorContext(&other))),
    }
}

/// A failed write, and whether DynamoDB may have applied it all the same.
#[derive(Debug)]
struct Failure {
    error: StoreError,
    maybe_applied: bool,
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        failure.error
    }
}

/// Whether a request that failed this way may have been applied: it timed
/// out, its answer was lost or unreadable, or the server failed (a 500 may
/// follow a write). A connection that could not be made (an I/O error, as
/// while the service is unreachable) or a refusal by the service means the
/// write did not happen; a connection reset after the request was sent is
/// also an I/O error, and is the one case counted as not applied that may
/// have been.
fn maybe_applied<E>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(failure) => !failure.is_io() && !failure.is_user(),
        SdkError::ServiceError(service) => service.raw().status().as_u16() >= 500,
        _ => false,
    }
}

impl DynamoDbStore {
    /// The conditional `PutItem` of `begin`, unbounded by the caller.
    async fn put_lock(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> Result<Begin, Failure> {
        let (ttl, end_ms) = self.expiry(lease);
        let call = self
            .client
            .put_item()
            .table_name(&*self.table)
            .item(PK, AttributeValue::S(self.partition_key(&key)))
            .item(TOKEN, token_value(&token))
            .item(FINGERPRINT, blob(fingerprint.as_bytes().to_vec()))
            .item(EXPIRES_AT, ttl)
            .item(EXPIRES_AT_MS, end_ms)
            .condition_expression(BEGIN_CONDITION)
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#exms", EXPIRES_AT_MS)
            .expression_attribute_values(":cutoff", self.cutoff())
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send();
        let old = self
            .conditional("PutItem", call, |e| match e {
                PutItemError::ConditionalCheckFailedException(e) => Ok(e.item),
                other => Err(Box::new(other)),
            })
            .await?;
        let refused = |error| Failure {
            error,
            maybe_applied: false,
        };
        match old {
            None => Ok(Begin::Acquired(token)),
            // An SDK retry of a write that had applied finds its own lock.
            Some(item) if held_by(&item, &token) && !item.contains_key(RECORD) => {
                Ok(Begin::Acquired(token))
            }
            Some(item) if item.is_empty() => Err(refused(StoreError::backend(
                "DynamoDB refused the lock without returning the item: the server does not support ReturnValuesOnConditionCheckFailure",
            ))),
            Some(item) => live_item(item).map_err(refused),
        }
    }
}

#[async_trait]
impl Store for DynamoDbStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LockToken::new();
        let (key, fingerprint) = (*key, *fingerprint);
        // The request runs on a task of its own, so that its answer
        // arrives even when the caller stops waiting (the bound, a dropped
        // future): a lock nobody received, or one the request may have
        // taken without saying so, is released under `token`.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let store = self.clone();
        tokio::spawn(async move {
            let (answer, unknown) = match store.put_lock(key, fingerprint, token, lease).await {
                Ok(begin) => (Ok(begin), false),
                Err(failure) => (Err(failure.error), failure.maybe_applied),
            };
            match tx.send(answer) {
                Ok(()) if unknown => {}
                Ok(()) => return,
                Err(Ok(Begin::Acquired(_))) => {}
                Err(_) if unknown => {}
                Err(_) => return,
            }
            if !unknown {
                release_unanswered(&store, &key, &token).await;
                return;
            }
            // A write still on its way lands whenever the server gets to
            // it: a release that finds nothing proves nothing yet. Look
            // again after one, two, four and eight times the bound (a
            // fenced release can only free this attempt's own lock).
            for n in [1, 2, 4, 8] {
                tokio::time::sleep(store.timeout * n).await;
                if release_unanswered(&store, &key, &token).await {
                    return;
                }
            }
        });
        match tokio::time::timeout(self.timeout, &mut rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(StoreError::backend("begin's task ended without an answer")),
            Err(_) => {
                // The task releases what it takes from here on. An answer
                // that arrived as the bound passed is released here.
                rx.close();
                if let Ok(Ok(Begin::Acquired(_))) = rx.try_recv() {
                    let store = self.clone();
                    tokio::spawn(async move {
                        release_unanswered(&store, &key, &token).await;
                    });
                }
                Err(StoreError::Timeout(self.timeout))
            }
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let encoded = record.encode();
        let limit = self.max_record_size();
        if encoded.len() > limit {
            return Err(StoreError::backend(RecordTooLarge {
                size: encoded.len(),
                limit,
            }));
        }
        let call = self
            .fenced_update(key, token, ttl)
            .update_expression("SET #rec = :rec, #exp = :exp, #exms = :exms")
            .expression_attribute_values(":rec", blob(encoded))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send();
        let old = self
            .conditional("UpdateItem", call, update_condition_failed)
            .await?;
        Ok(match old {
            None => true,
            // An SDK retry of a write that had applied finds its own record.
            Some(item) => held_by(&item, token) && item.contains_key(RECORD),
        })
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        let call = self
            .client
            .delete_item()
            .table_name(&*self.table)
            .key(PK, AttributeValue::S(self.partition_key(key)))
            .condition_expression(FENCE)
            .expression_attribute_names("#tok", TOKEN)
            .expression_attribute_names("#rec", RECORD)
            .expression_attribute_names("#exms", EXPIRES_AT_MS)
            .expression_attribute_values(":tok", token_value(token))
            .expression_attribute_values(":cutoff", self.cutoff())
            .send();
        let old = self
            .conditional("DeleteItem", call, |e| match e {
                DeleteItemError::ConditionalCheckFailedException(e) => Ok(e.item),
                other => Err(Box::new(other)),
            })
            .await?;
        Ok(old.is_none())
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let call = self
            .fenced_update(key, token, lease)
            .update_expression("SET #exp = :exp, #exms = :exms")
            .send();
        let old = self
            .conditional("UpdateItem", call, update_condition_failed)
            .await?;
        Ok(old.is_none())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_max_record_size(self.max_record_size())
    }

    /// Polls the item with `GetItem` every 50 ms (consistent or not, as
    /// configured) until it is gone, completed, expired or held by another
    /// token, or `timeout` passes. A failed read ends the wait early: the
    /// caller's next `begin` reports the failure.
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first: Option<(Option<Vec<u8>>, Option<u64>)> = None;
        loop {
            let read = self
                .bounded(
                    self.client
                        .get_item()
                        .table_name(&*self.table)
                        .key(PK, AttributeValue::S(self.partition_key(key)))
                        .consistent_read(self.consistent_reads)
                        .projection_expression("#tok, #exms, #fp")
                        .expression_attribute_names("#tok", TOKEN)
                        .expression_attribute_names("#exms", EXPIRES_AT_MS)
                        .expression_attribute_names("#fp", FINGERPRINT)
                        .send(),
                )
                .await;
            let item = match read {
                Ok(Ok(out)) => out.item,
                Ok(Err(e)) => {
                    tracing::debug!(key = %key, error = %DisplayErrorContext(&e), "wait could not read the item");
                    return Ok(());
                }
                Err(_) => return Ok(()),
            };
            let Some(item) = item else { return Ok(()) };
            // The projection leaves the record out (a read costs the whole
            // item all the same, but need not carry it): completing or
            // releasing changes the expiry or the token. So does a
            // heartbeat, which makes an allowed early return.
            let expires = match item.get(EXPIRES_AT_MS) {
                Some(AttributeValue::N(n)) => n.parse::<u64>().ok(),
                _ => None,
            };
            let cutoff = crate::util::unix_millis().saturating_sub(millis(self.skew_margin));
            if expires.is_none_or(|e| e <= cutoff) {
                return Ok(());
            }
            let seen = (binary(&item, TOKEN).map(<[u8]>::to_vec), expires);
            match &first {
                None => first = Some(seen),
                Some(first) if *first != seen => return Ok(()),
                Some(_) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(());
            }
            tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
        }
    }
}
