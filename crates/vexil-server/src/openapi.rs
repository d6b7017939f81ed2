//! The OpenAPI 3.1 document of Vexil's JSON API (`GET /v1/openapi.json`), generated from the same
//! descriptors and the same route table as the transcoding itself ([`crate::transcode`]), so it
//! cannot drift from what the server does:
//!
//! - one operation per HTTP rule, at the rule's path template (`{var}` for each variable, a
//!   `:verb` kept literally), `operationId` `Service_Method` (`Service_Method_2`, … for additional
//!   bindings), tagged with its service;
//! - parameters: the path variables (required), and for rules whose body is not `*` the request
//!   fields neither the path nor the body sets, as query parameters (nested fields dotted,
//!   repeated fields exploded; maps and JSON-valued fields are body-only and left out);
//! - the request body (`body: "*"`: the request message, less the path's fields; `body: "field"`:
//!   that field), the response (the output message or its `response_body` field; a server stream as
//!   `text/event-stream` and `application/x-ndjson`) and the error body (`Error`);
//! - `components.schemas`: every message and enum reachable, by full name (`vexil.v1.Flag`), in
//!   their proto3 JSON form: 64-bit integers as strings (`format: int64`/`uint64`), enums as their
//!   value names, `Timestamp` as a `date-time` string, `Duration` as `"1.5s"`, `Struct` as an
//!   object, `Value` as any JSON, wrappers as their value, repeated fields as arrays and maps as
//!   objects;
//! - descriptions from the protos' comments (the descriptor set carries source info);
//! - security: an API key as a bearer token or in `x-api-key`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::LazyLock;

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prost_reflect::{DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};
use tonic::Code;

use crate::transcode::{self, BodyRule, Route, RouteTable};

/// The OpenAPI document of the `/v1` JSON API (built once).
pub fn document() -> &'static Value {
    static DOCUMENT: LazyLock<Value> = LazyLock::new(build);
    &DOCUMENT
}

/// `GET /v1/openapi.json`.
pub(crate) async fn serve() -> Response {
    static SERIALIZED: LazyLock<Bytes> =
        LazyLock::new(|| Bytes::from(serde_json::to_vec(document()).unwrap_or_default()));
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        SERIALIZED.clone(),
    )
        .into_response()
}

const SCHEMAS: &str = "#/components/schemas/";

/// The name of the error body's schema.
const ERROR_SCHEMA: &str = "Error";

/// The HTTP methods an OpenAPI path item has a field for.
const OPENAPI_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn build() -> Value {
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Vexil API",
            "version": env!("CARGO_PKG_VERSION"),
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" },
            "description": INFO,
        },
        "security": [{ "bearerAuth": [] }, { "apiKeyHeader": [] }],
        "paths": {},
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`vx_…`) as `Authorization: Bearer <key>`.",
                },
                "apiKeyHeader": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "An API key (`vx_…`) in the `x-api-key` header.",
                },
            },
            "schemas": {},
        },
    });
    let (pool, table) = match (transcode::pool(), transcode::routes()) {
        (Ok(pool), Ok(table)) => (pool, table),
        (Err(e), _) | (_, Err(e)) => {
            document["info"]["description"] = Value::String(format!("{INFO}\n\nThe routes are unavailable: {e}"));
            return document;
        }
    };
    let comments = Comments::new(pool);
    let mut schemas = Schemas::new(&comments);
    let (paths, tags) = paths(table, &mut schemas);
    document["paths"] = Value::Object(paths);
    document["tags"] = Value::Array(tags);
    let error = schemas.error(pool);
    let mut components = schemas.finish();
    components.insert(ERROR_SCHEMA.to_owned(), error);
    document["components"]["schemas"] = Value::Object(components);
    document
}

const INFO: &str = "Vexil's JSON API: the `vexil.v1` gRPC services transcoded to HTTP by their \
`google.api.http` annotations. Requests and responses are proto3 JSON (camelCase field names; \
64-bit integers as strings; every field present in responses except unset messages, unset \
optional fields and unset oneof members). Unknown fields and query parameters are rejected. \
Errors are `{\"code\", \"status\", \"message\", \"problems\"}` with the HTTP status of their gRPC \
code. Server streams are Server-Sent Events (`text/event-stream`) or, with \
`Accept: application/x-ndjson`, newline-delimited JSON. Without any API key in the store, the \
admin API is open to clients on the same machine only.";

/// The path items, and a tag per service.
fn paths(table: &RouteTable, schemas: &mut Schemas<'_>) -> (Map<String, Value>, Vec<Value>) {
    let mut paths = Map::new();
    let mut tags: Vec<Value> = Vec::new();
    for route in table.routes() {
        let method = route.method.as_str().to_ascii_lowercase();
        if !OPENAPI_METHODS.contains(&method.as_str()) {
            continue;
        }
        let service = route.rpc.parent_service();
        if !tags.iter().any(|t| t["name"] == service.name()) {
            let mut tag = json!({ "name": service.name() });
            if let Some(description) = schemas.comments.get(&service.parent_file(), service.path()) {
                tag["description"] = Value::String(description.to_owned());
            }
            tags.push(tag);
        }
        let item = paths
            .entry(route.template.openapi_path())
            .or_insert_with(|| Value::Object(Map::new()));
        item[method.as_str()] = operation(route, schemas);
    }
    (paths, tags)
}

fn operation(route: &Route, schemas: &mut Schemas<'_>) -> Value {
    let rpc = &route.rpc;
    let service = rpc.parent_service();
    let mut id = format!("{}_{}", service.name(), rpc.name());
    if route.binding > 0 {
        id.push_str(&format!("_{}", route.binding + 1));
    }
    let comment = schemas.comments.get(&rpc.parent_file(), rpc.path());
    let grpc = format!("gRPC: `{}/{}`.", service.full_name(), rpc.name());
    let description = match comment {
        Some(comment) => format!("{comment}\n\n{grpc}"),
        None => grpc,
    };
    let summary = comment.map_or_else(|| rpc.name().to_owned(), first_sentence);
    let mut operation = json!({
        "operationId": id,
        "tags": [service.name()],
        "summary": summary,
        "description": description,
    });
    let mut parameters = Vec::new();
    for (variable, fields) in route.template.variables().iter().zip(&route.path_fields) {
        let Some(leaf) = fields.last() else { continue };
        let mut parameter = json!({
            "name": variable.field_path,
            "in": "path",
            "required": true,
            "schema": schemas.value(leaf),
        });
        if let Some(description) = schemas.field_description(leaf) {
            parameter["description"] = Value::String(description);
        }
        parameters.push(parameter);
    }
    let input = rpc.input();
    if !matches!(route.body, BodyRule::Whole) {
        let mut bound: Vec<Vec<u32>> = route
            .path_fields
            .iter()
            .map(|f| f.iter().map(FieldDescriptor::number).collect())
            .collect();
        if let BodyRule::Field(field) = &route.body {
            bound.push(vec![field.number()]);
        }
        schemas.query_parameters(&input, "", &[], &bound, &mut parameters);
    }
    if !parameters.is_empty() {
        operation["parameters"] = Value::Array(parameters);
    }
    match &route.body {
        BodyRule::None => {}
        BodyRule::Whole => {
            let schema = if route.path_fields.is_empty() {
                schemas.message(&input)
            } else {
                schemas.body_without_path(&input, route)
            };
            operation["requestBody"] = json!({
                "required": false,
                "description": "The request: an empty body is the empty message.",
                "content": { "application/json": { "schema": schema } },
            });
        }
        BodyRule::Field(field) => {
            let schema = schemas.field(field);
            operation["requestBody"] = json!({
                "required": true,
                "description": format!("The request's `{}` field.", field.json_name()),
                "content": { "application/json": { "schema": schema } },
            });
        }
    }
    let output = rpc.output();
    let schema = match &route.response_body {
        Some(field) => schemas.field(field),
        None => schemas.message(&output),
    };
    let success = if rpc.is_server_streaming() {
        json!({
            "description": format!(
                "A stream of `{}` messages, each written as it is ready: Server-Sent Events (one \
                 `data:` event per message, the JSON of the schema below; a failure ends the stream \
                 with an `event: error` whose data is an `Error`), or newline-delimited JSON with \
                 `Accept: application/x-ndjson` (a failure being a last line `{{\"error\": …}}`).",
                output.full_name()
            ),
            "content": {
                "text/event-stream": { "schema": { "type": "string" } },
                "application/x-ndjson": { "schema": schema },
            },
        })
    } else {
        json!({
            "description": format!("`{}`.", output.full_name()),
            "content": { "application/json": { "schema": schema } },
        })
    };
    operation["responses"] = json!({
        "200": success,
        "default": {
            "description": "An error, with the HTTP status of its gRPC code (400 invalid argument, \
                            401 unauthenticated, 403 permission denied, 404 not found, 409 already \
                            exists or stale version, 503 unavailable, …).",
            "content": { "application/json": { "schema": { "$ref": format!("{SCHEMAS}{ERROR_SCHEMA}") } } },
        },
    });
    operation
}

/// The schemas reachable from the operations, defined as they are referenced.
struct Schemas<'a> {
    comments: &'a Comments,
    defined: BTreeMap<String, Value>,
    seen: HashSet<String>,
    pending: Vec<Definition>,
}

enum Definition {
    Message(MessageDescriptor),
    Enum(EnumDescriptor),
}

impl<'a> Schemas<'a> {
    fn new(comments: &'a Comments) -> Schemas<'a> {
        Schemas {
            comments,
            defined: BTreeMap::new(),
            seen: HashSet::new(),
            pending: Vec::new(),
        }
    }

    /// Every schema referenced so far, and those they reference.
    fn finish(mut self) -> Map<String, Value> {
        while let Some(definition) = self.pending.pop() {
            let (name, schema) = match definition {
                Definition::Message(message) => (message.full_name().to_owned(), self.define_message(&message)),
                Definition::Enum(e) => (e.full_name().to_owned(), self.define_enum(&e)),
            };
            self.defined.insert(name, schema);
        }
        self.defined.into_iter().collect()
    }

    fn reference(&mut self, name: &str, definition: impl FnOnce() -> Definition) -> Value {
        if self.seen.insert(name.to_owned()) {
            self.pending.push(definition());
        }
        json!({ "$ref": format!("{SCHEMAS}{name}") })
    }

    /// The schema of a message: a well-known type inline, any other a reference.
    fn message(&mut self, message: &MessageDescriptor) -> Value {
        let wrapped = |this: &mut Self| {
            let value = message.get_field_by_name("value").map(|f| f.kind());
            value.map_or_else(|| json!({}), |kind| this.kind(&kind))
        };
        match message.full_name() {
            "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
            "google.protobuf.Duration" => json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$" }),
            "google.protobuf.Struct" => json!({ "type": "object", "additionalProperties": true }),
            "google.protobuf.Value" => json!({}),
            "google.protobuf.ListValue" => json!({ "type": "array", "items": {} }),
            "google.protobuf.FieldMask" => json!({ "type": "string" }),
            "google.protobuf.Empty" => json!({ "type": "object" }),
            "google.protobuf.Any" => json!({
                "type": "object",
                "properties": { "@type": { "type": "string" } },
                "required": ["@type"],
                "additionalProperties": true,
            }),
            "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue" => wrapped(self),
            name => {
                let message = message.clone();
                self.reference(name, move || Definition::Message(message))
            }
        }
    }

    /// The schema of one value of `kind` (proto3 JSON).
    fn kind(&mut self, kind: &Kind) -> Value {
        match kind {
            Kind::Double => json!({ "type": "number", "format": "double" }),
            Kind::Float => json!({ "type": "number", "format": "float" }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({ "type": "integer", "format": "int32" }),
            Kind::Uint32 | Kind::Fixed32 => json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX }),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({ "type": "string", "format": "int64" }),
            Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64" }),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
            Kind::Enum(e) => {
                let e = e.clone();
                self.reference(e.full_name(), || Definition::Enum(e.clone()))
            }
            Kind::Message(message) => self.message(message),
        }
    }

    /// The schema of a field's value: the kind, in an array or a map as the field is.
    fn value(&mut self, field: &FieldDescriptor) -> Value {
        let kind = field.kind();
        if field.is_map()
            && let Kind::Message(entry) = &kind
        {
            let value = self.kind(&entry.map_entry_value_field().kind());
            return json!({ "type": "object", "additionalProperties": value });
        }
        if field.is_list() {
            return json!({ "type": "array", "items": self.kind(&kind) });
        }
        self.kind(&kind)
    }

    /// The schema of a field as a property: its value and its description.
    fn field(&mut self, field: &FieldDescriptor) -> Value {
        let mut schema = self.value(field);
        if let (Some(description), Some(object)) = (self.field_description(field), schema.as_object_mut()) {
            object.insert("description".to_owned(), Value::String(description));
        }
        schema
    }

    /// A field's comment, and what its oneof implies.
    fn field_description(&self, field: &FieldDescriptor) -> Option<String> {
        let mut parts: Vec<String> = Vec::new();
        if let Some(comment) = self.comments.get(&field.parent_file(), field.path()) {
            parts.push(comment.to_owned());
        }
        if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic()) {
            let members: Vec<String> = oneof.fields().map(|f| format!("`{}`", f.json_name())).collect();
            parts.push(format!(
                "One of `{}`: at most one of {} is set.",
                oneof.name(),
                members.join(", ")
            ));
        }
        (!parts.is_empty()).then(|| parts.join("\n\n"))
    }

    fn define_message(&mut self, message: &MessageDescriptor) -> Value {
        let mut properties = Map::new();
        for field in message.fields() {
            let schema = self.field(&field);
            properties.insert(field.json_name().to_owned(), schema);
        }
        let mut schema = json!({ "type": "object", "properties": properties });
        if let Some(description) = self.comments.get(&message.parent_file(), message.path()) {
            schema["description"] = Value::String(description.to_owned());
        }
        schema
    }

    fn define_enum(&self, e: &EnumDescriptor) -> Value {
        let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
        let mut schema = json!({ "type": "string", "enum": names });
        if let Some(description) = self.comments.get(&e.parent_file(), e.path()) {
            schema["description"] = Value::String(description.to_owned());
        }
        schema
    }

    /// A `body: "*"` request body whose path sets some fields: the message without them.
    fn body_without_path(&mut self, input: &MessageDescriptor, route: &Route) -> Value {
        let in_path: Vec<u32> = route
            .path_fields
            .iter()
            .filter(|f| f.len() == 1)
            .filter_map(|f| f.first().map(FieldDescriptor::number))
            .collect();
        let mut properties = Map::new();
        for field in input.fields().filter(|f| !in_path.contains(&f.number())) {
            let schema = self.field(&field);
            properties.insert(field.json_name().to_owned(), schema);
        }
        let path: Vec<&str> = route
            .template
            .variables()
            .iter()
            .map(|v| v.field_path.as_str())
            .collect();
        json!({
            "type": "object",
            "description": format!(
                "`{}` without the fields the path sets ({}).",
                input.full_name(),
                path.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
            ),
            "properties": properties,
        })
    }

    /// The query parameters of `message`'s fields not `bound` (by the path or the body): nested
    /// messages flattened with dots, maps and JSON-valued fields left out.
    fn query_parameters(
        &mut self,
        message: &MessageDescriptor,
        prefix: &str,
        numbers: &[u32],
        bound: &[Vec<u32>],
        out: &mut Vec<Value>,
    ) {
        const JSON_VALUED: [&str; 5] = [
            "google.protobuf.Struct",
            "google.protobuf.Value",
            "google.protobuf.ListValue",
            "google.protobuf.Any",
            "google.protobuf.Empty",
        ];
        for field in message.fields() {
            let path: Vec<u32> = numbers.iter().copied().chain([field.number()]).collect();
            if field.is_map() || bound.contains(&path) {
                continue;
            }
            let name = format!("{prefix}{}", field.json_name());
            if let Kind::Message(inner) = field.kind() {
                if JSON_VALUED.contains(&inner.full_name()) {
                    continue;
                }
                if !transcode::is_well_known(&inner) {
                    // Nested fields, a few levels deep (recursive messages stop there).
                    if !field.is_list() && path.len() < 4 {
                        self.query_parameters(&inner, &format!("{name}."), &path, bound, out);
                    }
                    continue;
                }
            }
            let mut parameter = json!({
                "name": name,
                "in": "query",
                "required": false,
                "schema": self.value(&field),
            });
            if field.is_list() {
                parameter["style"] = json!("form");
                parameter["explode"] = json!(true);
            }
            if let Some(description) = self.field_description(&field) {
                parameter["description"] = Value::String(description);
            }
            out.push(parameter);
        }
    }

    /// The error body's schema.
    fn error(&mut self, pool: &DescriptorPool) -> Value {
        let problem = pool.get_message_by_name("vexil.v1.Problem").map_or_else(
            || json!({ "type": "object", "properties": { "pointer": { "type": "string" }, "message": { "type": "string" } } }),
            |problem| self.message(&problem),
        );
        let names: Vec<&str> = (0..=16).map(|c| transcode::status_name(Code::from_i32(c))).collect();
        json!({
            "type": "object",
            "description": "An error: its gRPC status code and name, and the problems of an invalid input.",
            "required": ["code", "status", "message"],
            "properties": {
                "code": { "type": "integer", "format": "int32", "description": "The gRPC status code (3: INVALID_ARGUMENT, …)." },
                "status": { "type": "string", "enum": names },
                "message": { "type": "string" },
                "problems": {
                    "type": "array",
                    "items": problem,
                    "description": "Each problem of an invalid input, at a JSON pointer into the request or the flag set's flagd document.",
                },
            },
        })
    }
}

/// The protos' comments, by file and descriptor path (from the descriptors' source info).
struct Comments {
    by_path: HashMap<(String, Vec<i32>), String>,
}

impl Comments {
    fn new(pool: &DescriptorPool) -> Comments {
        let mut by_path = HashMap::new();
        for file in pool.files() {
            let Some(info) = &file.file_descriptor_proto().source_code_info else {
                continue;
            };
            for location in &info.location {
                let text = location
                    .leading_comments
                    .as_deref()
                    .or(location.trailing_comments.as_deref())
                    .map(clean)
                    .filter(|t| !t.is_empty());
                if let Some(text) = text {
                    by_path.insert((file.name().to_owned(), location.path.clone()), text);
                }
            }
        }
        Comments { by_path }
    }

    fn get(&self, file: &prost_reflect::FileDescriptor, path: &[i32]) -> Option<&str> {
        self.by_path
            .get(&(file.name().to_owned(), path.to_vec()))
            .map(String::as_str)
    }
}

/// The first sentence of a comment's first paragraph, on one line, without its period.
fn first_sentence(comment: &str) -> String {
    let paragraph = comment.split("\n\n").next().unwrap_or_default().replace('\n', " ");
    let end = paragraph.find(". ").unwrap_or(paragraph.len());
    paragraph[..end].trim_end_matches('.').trim().to_owned()
}

/// A comment's text: each line trimmed, lines joined.
fn clean(comment: &str) -> String {
    comment
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(object) => {
                if let Some(Value::String(target)) = object.get("$ref") {
                    out.push(target);
                }
                object.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    fn operation(method: &str, path: &str) -> &'static Value {
        let op = &document()["paths"][path][method];
        assert!(op.is_object(), "no {method} {path}");
        op
    }

    fn parameter<'a>(op: &'a Value, name: &str) -> &'a Value {
        op["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("no parameter {name} in {op}"))
    }

    #[test]
    fn the_document_has_an_operation_for_every_route() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let routes = transcode::routes().unwrap().routes();
        assert!(!routes.is_empty());
        let mut ids = HashSet::new();
        for route in routes {
            let path = route.template.openapi_path();
            let op = operation(&route.method.as_str().to_ascii_lowercase(), &path);
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_owned()), "operationId {id} twice");
            assert_eq!(
                id,
                format!("{}_{}", route.rpc.parent_service().name(), route.rpc.name())
            );
            // Every `{var}` of the path is a required path parameter, and only those.
            let in_path: Vec<&str> = route
                .template
                .variables()
                .iter()
                .map(|v| v.field_path.as_str())
                .collect();
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .inspect(|p| assert_eq!(p["required"], true))
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(declared, in_path, "{path}");
            for var in in_path {
                assert!(path.contains(&format!("{{{var}}}")), "{path}");
            }
            assert!(op["responses"]["200"].is_object() && op["responses"]["default"].is_object());
        }
        let count: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(count, routes.len());
    }

    #[test]
    fn every_reference_resolves_and_the_document_round_trips() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut targets = Vec::new();
        refs(doc, &mut targets);
        assert!(targets.len() > 50, "{}", targets.len());
        for target in targets {
            let name = target.strip_prefix(SCHEMAS).unwrap_or_else(|| panic!("{target}"));
            assert!(schemas.contains_key(name), "{target} does not resolve");
        }
        // Every component is used (reachable from an operation).
        let text = serde_json::to_string(doc).unwrap();
        for name in schemas.keys() {
            assert!(text.contains(&format!("\"{SCHEMAS}{name}\"")), "{name} is unused");
        }
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(&back, doc);
        let pretty: Value = serde_json::from_str(&serde_json::to_string_pretty(doc).unwrap()).unwrap();
        assert_eq!(&pretty, doc);
    }

    #[test]
    fn schemas_are_the_proto3_json_forms_with_the_protos_comments() {
        let schemas = &document()["components"]["schemas"];
        let environment = &schemas["vexil.v1.Environment"];
        assert_eq!(environment["type"], "object");
        assert!(
            environment["description"]
                .as_str()
                .unwrap()
                .starts_with("An environment")
        );
        let props = &environment["properties"];
        assert_eq!(
            props["configVersion"],
            json!({"type": "string", "format": "int64", "description": "The environment's latest config version (0 before its first change)."})
        );
        assert_eq!(props["created"]["$ref"], "#/components/schemas/vexil.v1.Stamp");
        assert_eq!(
            schemas["vexil.v1.Stamp"]["properties"]["at"],
            json!({"type": "string", "format": "date-time"})
        );
        assert_eq!(schemas["vexil.v1.Flag"]["properties"]["tags"]["type"], "array");
        assert_eq!(schemas["vexil.v1.Flag"]["properties"]["definition"]["type"], "object");
        assert_eq!(
            schemas["vexil.v1.Segment"]["properties"]["rule"]["description"],
            "The JsonLogic rule."
        );
        assert_eq!(
            schemas["vexil.v1.ValueType"]["enum"],
            json!([
                "VALUE_TYPE_ANY",
                "VALUE_TYPE_BOOLEAN",
                "VALUE_TYPE_STRING",
                "VALUE_TYPE_INTEGER",
                "VALUE_TYPE_FLOAT",
                "VALUE_TYPE_OBJECT"
            ])
        );
        let evaluate = &schemas["vexil.v1.EvaluateResponse"]["properties"];
        assert_eq!(evaluate["intValue"]["format"], "int64");
        assert!(
            evaluate["boolValue"]["description"]
                .as_str()
                .unwrap()
                .contains("One of `typed`")
        );
        assert_eq!(
            evaluate["value"]["description"],
            "The value as JSON (absent when the caller's default applies)."
        );
        let error = &schemas[ERROR_SCHEMA];
        assert_eq!(
            error["properties"]["problems"]["items"]["$ref"],
            "#/components/schemas/vexil.v1.Problem"
        );
        assert!(
            error["properties"]["status"]["enum"]
                .as_array()
                .unwrap()
                .contains(&json!("INVALID_ARGUMENT"))
        );
        assert_eq!(
            document()["components"]["securitySchemes"]["bearerAuth"]["scheme"],
            "bearer"
        );
    }

    #[test]
    fn operations_have_their_parameters_bodies_and_responses() {
        let audit = operation("get", "/v1/audit");
        assert_eq!(audit["operationId"], "AdminService_ListAuditEntries");
        assert_eq!(
            parameter(audit, "since")["schema"],
            json!({"type": "string", "format": "date-time"})
        );
        assert_eq!(parameter(audit, "since")["in"], "query");
        assert_eq!(parameter(audit, "pageSize")["schema"]["type"], "integer");
        assert!(
            parameter(audit, "entity")["description"]
                .as_str()
                .unwrap()
                .contains("everything under it")
        );
        assert!(audit.get("requestBody").is_none());
        assert_eq!(
            audit["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/vexil.v1.ListAuditEntriesResponse"
        );

        let import = operation("post", "/v1/environments/{environment}/flag-sets/{flag_set}:import");
        assert_eq!(parameter(import, "flag_set")["in"], "path");
        let body = &import["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(
            body["properties"].as_object().unwrap().keys().collect::<Vec<_>>(),
            ["document"]
        );

        let revoke = operation("post", "/v1/api-keys/{id}:revoke");
        assert_eq!(
            parameter(revoke, "id")["schema"],
            json!({"type": "string", "format": "int64"})
        );

        let delete = operation(
            "delete",
            "/v1/environments/{environment}/flag-sets/{flag_set}/flags/{key}",
        );
        assert_eq!(parameter(delete, "version")["in"], "query");
        assert_eq!(delete["parameters"].as_array().unwrap().len(), 4);

        let create = operation("post", "/v1/environments");
        assert_eq!(
            create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/vexil.v1.CreateEnvironmentRequest"
        );
        assert_eq!(create["parameters"], Value::Null);

        let validate = operation(
            "post",
            "/v1/environments/{environment}/flag-sets/{flag_set}/flags/{key}:validate",
        );
        assert!(
            validate["summary"]
                .as_str()
                .unwrap()
                .starts_with("Checks a flag as PutFlag would")
        );
        assert!(
            validate["description"]
                .as_str()
                .unwrap()
                .contains("gRPC: `vexil.v1.AdminService/ValidateFlag`.")
        );

        let watch = operation("get", "/v1/environments/{environment}/config:watch");
        assert_eq!(
            watch["summary"],
            "The configuration as it changes (JSON: Server-Sent Events)"
        );
        let content = &watch["responses"]["200"]["content"];
        assert!(content["text/event-stream"].is_object());
        assert_eq!(
            content["application/x-ndjson"]["schema"]["$ref"],
            "#/components/schemas/vexil.v1.ConfigEvent"
        );
        assert_eq!(parameter(watch, "flagSet")["in"], "query");
        assert_eq!(parameter(watch, "sinceVersion")["in"], "query");
        let tags: Vec<&Value> = document()["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["name"])
            .collect();
        assert_eq!(
            tags,
            [
                &json!("AdminService"),
                &json!("EvaluationService"),
                &json!("ConfigService"),
                &json!("TrackingService"),
                &json!("BootstrapService")
            ]
        );
        let track = operation("post", "/v1/track:batch");
        assert!(
            track["description"]
                .as_str()
                .unwrap()
                .contains("gRPC: `vexil.v1.TrackingService/TrackBatch`."),
            "{track}"
        );
    }
}
