//! `google.protobuf.Struct` as a JSON object: every generated message's `Struct` field is a
//! [`JsonStruct`], with no intermediate protobuf `Struct`/`Value` tree.
//!
//! A `Struct` decoded from the wire is checked in full (as prost would decode it: wire types,
//! UTF-8, lengths, the recursion limit) and kept in its wire form, one copy of its bytes: an
//! evaluation context is then written straight into the rules' arena from those bytes
//! ([`vexil_core::Attributes`]), strings borrowed, with no heap allocation per attribute and
//! nothing to free per attribute afterwards. [`JsonStruct::into_map`] decodes it into JSON when a
//! caller wants one; a `JsonStruct` made from JSON encodes from it.
//!
//! Wire format (`google/protobuf/struct.proto`): a `Struct` is a map `1: {1: key, 2: Value}`; a
//! `Value` is a oneof of `1` null (enum), `2` number (double), `3` string, `4` bool, `5` `Struct`
//! and `6` `ListValue` (`1: repeated Value`). Conversions:
//! - protobuf numbers are doubles: an integral one below 2^53 in magnitude becomes a JSON integer,
//!   any other finite one a JSON float, NaN and infinities `null`; JSON numbers are sent as doubles;
//! - a key repeated in a `Struct` keeps its last value (a protobuf map merge); a message field
//!   repeated inside a `Value` merges as protobuf says (objects merge, lists append);
//! - an empty `Value` is `null`; unknown fields are skipped;
//! - nesting counts against prost's recursion limit exactly as prost's own `Struct` does (a map
//!   entry, a `Value` and a `Struct` are three levels), so hostile input is a `DecodeError`.

// Hand-written: linted as the rest of the workspace (the crate root allows lints for generated code).
#![warn(clippy::all, missing_debug_implementations, rust_2018_idioms)]

use std::{fmt, mem};

use prost::DecodeError;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{
    self, DecodeContext, WireType, decode_varint, double, encode_key, encode_varint, encoded_len_varint, int32,
    key_len, message, skip_field, string,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};
use vexil_core::context::{Admit, Attr, Attributes, Builder, List, Object};

/// A `google.protobuf.Struct`: a JSON object, or the checked wire form of one as decoded.
///
/// Its serde form is the plain JSON object (the proto3 JSON mapping of `Struct`); numbers read
/// from JSON go through a double, as they would on the protobuf wire.
#[derive(Clone, Default)]
pub struct JsonStruct {
    /// Entries made from JSON.
    map: Map<String, Value>,
    /// Entries decoded from the wire, as received (`Struct` field 1, each checked); only while
    /// `map` is empty.
    wire: Vec<u8>,
}

impl JsonStruct {
    /// The JSON object (decoding the wire form).
    pub fn into_map(self) -> Map<String, Value> {
        if self.wire.is_empty() {
            self.map
        } else {
            decode_map(&self.wire)
        }
    }

    /// A copy of the JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        if self.wire.is_empty() {
            self.map.clone()
        } else {
            decode_map(&self.wire)
        }
    }

    /// Whether the object has no entries.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.wire.is_empty()
    }
}

impl From<Map<String, Value>> for JsonStruct {
    fn from(map: Map<String, Value>) -> Self {
        JsonStruct { map, wire: Vec::new() }
    }
}

impl From<JsonStruct> for Map<String, Value> {
    fn from(s: JsonStruct) -> Self {
        s.into_map()
    }
}

impl fmt::Debug for JsonStruct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("JsonStruct").field(&self.to_map()).finish()
    }
}

impl PartialEq for JsonStruct {
    fn eq(&self, other: &Self) -> bool {
        self.to_map() == other.to_map()
    }
}

/// The attributes, written into the rules' arena: from the wire form without decoding it into
/// JSON first.
impl Attributes for JsonStruct {
    fn write<'a>(&'a self, out: &mut Object<'a>) {
        self.map.write(out);
        // Checked when decoded: a failure here cannot happen, and would only end the writing.
        let _ = write_fields(Reader(&self.wire), out);
    }
}

/// A protobuf number (a double) as JSON: integral ones below 2^53 as integers (as flagd's
/// float64 would print), NaN and infinities as `null`.
pub fn json_number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

// === impl JsonStruct ===

impl prost::Message for JsonStruct {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_fields(&self.map, buf);
        buf.put_slice(&self.wire);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != 1 {
            return skip_field(wire_type, tag, buf, ctx);
        }
        if !self.map.is_empty() {
            // Merging into JSON: decode the entry.
            return merge_entry(&mut self.map, wire_type, buf, ctx);
        }
        let mut peek = Reader(buf.chunk());
        let field_len = match peek.varint() {
            Ok(len) if wire_type == WireType::LengthDelimited && len <= peek.0.len() as u64 => {
                buf.chunk().len() - peek.0.len() + len as usize
            }
            _ => {
                // Split across buffers, or malformed (prost then says what is wrong): decoded
                // into JSON and kept encoded again.
                let mut entry = Entry::default();
                message::merge(wire_type, &mut entry, buf, ctx)?;
                encode_key(1, WireType::LengthDelimited, &mut self.wire);
                encode_varint(entry_len(&entry.key, &entry.value.0) as u64, &mut self.wire);
                encode_entry(&entry.key, &entry.value.0, &mut self.wire);
                return Ok(());
            }
        };
        // Keep the field as received (length and body), then check it as prost would decode it.
        let at = self.wire.len();
        if at == 0 {
            self.wire.reserve(WIRE_CAPACITY);
        }
        self.wire.push(ENTRY_KEY);
        self.wire.extend_from_slice(&buf.chunk()[..field_len]);
        buf.advance(field_len);
        let field = &self.wire[at + 1..];
        let checked = match Reader(field).bytes().and_then(|entry| check_entry(Reader(entry), 0)) {
            Ok(()) => Ok(()),
            // Beyond what the fast check reads (deep nesting, groups) or malformed: prost decides,
            // and says what is wrong.
            Err(Unread) => message::merge(WireType::LengthDelimited, &mut Check(Kind::Entry), &mut &*field, ctx),
        };
        if checked.is_err() {
            self.wire.truncate(at);
        }
        checked
    }

    fn encoded_len(&self) -> usize {
        fields_len(&self.map) + self.wire.len()
    }

    fn clear(&mut self) {
        self.map.clear();
        self.wire.clear();
    }
}

/// The key of `Struct` field 1 (length-delimited).
const ENTRY_KEY: u8 = 1 << 3 | 2;

/// The first allocation of a decoded `Struct`'s bytes: room for a typical evaluation context.
const WIRE_CAPACITY: usize = 256;

impl Serialize for JsonStruct {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.wire.is_empty() {
            self.map.serialize(serializer)
        } else {
            decode_map(&self.wire).serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for JsonStruct {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut map = Map::deserialize(deserializer)?;
        map.values_mut().for_each(as_on_the_wire);
        Ok(JsonStruct::from(map))
    }
}

/// Every number of `v` as the wire would carry it: through a double.
fn as_on_the_wire(v: &mut Value) {
    match v {
        Value::Number(n) => *v = json_number(n.as_f64().unwrap_or(0.0)),
        Value::Array(items) => items.iter_mut().for_each(as_on_the_wire),
        Value::Object(map) => map.values_mut().for_each(as_on_the_wire),
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

// === decoding into JSON: a Struct, a map entry, a Value and a ListValue as messages of their own ===

/// The JSON object a checked wire form stands for.
fn decode_map(wire: &[u8]) -> Map<String, Value> {
    // Checked when decoded: an error cannot happen, and would only leave entries out.
    let mut decoded = Decoded::default();
    let _ = prost::Message::merge(&mut decoded, wire);
    decoded.0
}

/// One map entry decoded into `map` (a later key replaces an earlier one, as a protobuf map merge does).
fn merge_entry(
    map: &mut Map<String, Value>,
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    let mut entry = Entry::default();
    message::merge(wire_type, &mut entry, buf, ctx)?;
    map.insert(entry.key, entry.value.0);
    Ok(())
}

/// A `Struct` decoded into JSON.
#[derive(Debug, Default)]
struct Decoded(Map<String, Value>);

impl prost::Message for Decoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_fields(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != 1 {
            return skip_field(wire_type, tag, buf, ctx);
        }
        merge_entry(&mut self.0, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        fields_len(&self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// One entry of a `Struct`'s map.
#[derive(Debug, Default)]
struct Entry {
    key: String,
    value: JsonValue,
}

impl prost::Message for Entry {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_entry(&self.key, &self.value.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => string::merge(wire_type, &mut self.key, buf, ctx),
            2 => message::merge(wire_type, &mut self.value, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        entry_len(&self.key, &self.value.0)
    }

    fn clear(&mut self) {
        *self = Entry::default();
    }
}

/// A `google.protobuf.Value` (an empty one is `null`).
#[derive(Debug, Default)]
struct JsonValue(Value);

impl prost::Message for JsonValue {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_value(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => {
                let mut null = 0;
                int32::merge(wire_type, &mut null, buf, ctx)?;
                self.0 = Value::Null;
            }
            2 => {
                let mut n = 0.0;
                double::merge(wire_type, &mut n, buf, ctx)?;
                self.0 = json_number(n);
            }
            3 => {
                let mut s = String::new();
                string::merge(wire_type, &mut s, buf, ctx)?;
                self.0 = Value::String(s);
            }
            4 => {
                let mut b = false;
                encoding::bool::merge(wire_type, &mut b, buf, ctx)?;
                self.0 = Value::Bool(b);
            }
            5 => {
                let mut object = match mem::take(&mut self.0) {
                    Value::Object(map) => Decoded(map),
                    _ => Decoded::default(),
                };
                message::merge(wire_type, &mut object, buf, ctx)?;
                self.0 = Value::Object(object.0);
            }
            6 => {
                let mut list = match mem::take(&mut self.0) {
                    Value::Array(items) => JsonList(items),
                    _ => JsonList::default(),
                };
                message::merge(wire_type, &mut list, buf, ctx)?;
                self.0 = Value::Array(list.0);
            }
            _ => skip_field(wire_type, tag, buf, ctx)?,
        }
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        value_len(&self.0)
    }

    fn clear(&mut self) {
        self.0 = Value::Null;
    }
}

/// A `google.protobuf.ListValue`.
#[derive(Debug, Default)]
struct JsonList(Vec<Value>);

impl prost::Message for JsonList {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_list(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != 1 {
            return skip_field(wire_type, tag, buf, ctx);
        }
        let mut value = JsonValue::default();
        message::merge(wire_type, &mut value, buf, ctx)?;
        self.0.push(value.0);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        list_len(&self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

// === checking: what prost would decode, with nothing kept ===

/// Which message of `struct.proto` a [`Check`] reads.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Struct,
    Entry,
    Value,
    List,
}

/// Reads a message as prost would decode it (wire types, lengths, UTF-8, the recursion limit)
/// and keeps nothing: a decoded `Struct` is checked in full before its bytes are kept.
#[derive(Debug)]
struct Check(Kind);

impl prost::Message for Check {
    fn encode_raw(&self, _: &mut impl BufMut) {}

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match (self.0, tag) {
            (Kind::Struct, 1) => message::merge(wire_type, &mut Check(Kind::Entry), buf, ctx),
            (Kind::Entry, 1) | (Kind::Value, 3) => check_string(wire_type, buf, ctx),
            (Kind::Entry, 2) | (Kind::List, 1) => message::merge(wire_type, &mut Check(Kind::Value), buf, ctx),
            (Kind::Value, 1) => int32::merge(wire_type, &mut 0, buf, ctx),
            (Kind::Value, 2) => double::merge(wire_type, &mut 0.0, buf, ctx),
            (Kind::Value, 4) => encoding::bool::merge(wire_type, &mut false, buf, ctx),
            (Kind::Value, 5) => message::merge(wire_type, &mut Check(Kind::Struct), buf, ctx),
            (Kind::Value, 6) => message::merge(wire_type, &mut Check(Kind::List), buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {}
}

/// A string field, checked as prost's `string::merge` would, without copying it (prost's own
/// decoding says what is wrong with a bad one).
fn check_string(wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
    let mut peek = buf.chunk();
    if let Ok(len) = decode_varint(&mut peek)
        && wire_type == WireType::LengthDelimited
        && len <= peek.len() as u64
        && std::str::from_utf8(&peek[..len as usize]).is_ok()
    {
        buf.advance(buf.chunk().len() - peek.len() + len as usize);
        return Ok(());
    }
    string::merge(wire_type, &mut String::new(), buf, ctx)
}

// === reading the wire form: a fast check, and the writing into the rules' arena ===

/// Bytes the fast reader does not take: malformed, or beyond what it reads (groups, nesting deeper
/// than [`FAST_DEPTH`]). Decoding then falls back to prost; writing cannot meet it (what is
/// written was checked).
#[derive(Debug)]
struct Unread;

/// Nesting the fast check reads (a `Struct` field at prost's depth 0–3 in flagd's messages, so
/// far inside prost's limit of 100); deeper input is checked by prost itself.
const FAST_DEPTH: u32 = 24;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const DELIMITED: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// A protobuf reader over a slice: fields as prost reads them, no stricter and no looser.
#[derive(Debug, Clone, Copy)]
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[inline(always)]
    fn varint(&mut self) -> Result<u64, Unread> {
        match self.0 {
            [b, rest @ ..] if *b < 0x80 => {
                self.0 = rest;
                Ok(u64::from(*b))
            }
            _ => self.long_varint(),
        }
    }

    /// At most 10 bytes, the tenth at most 1 (prost's rule).
    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, Unread> {
        let mut value = 0;
        for (i, &b) in self.0.iter().take(10).enumerate() {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b > 1 {
                    return Err(Unread);
                }
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(Unread)
    }

    /// A field key: (tag, wire type).
    #[inline(always)]
    fn key(&mut self) -> Result<(u32, u8), Unread> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) || key >> 3 == 0 {
            return Err(Unread);
        }
        Ok(((key >> 3) as u32, (key & 7) as u8))
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Unread> {
        if n > self.0.len() {
            return Err(Unread);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// A length-delimited field's body.
    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], Unread> {
        let len = self.varint()?;
        self.take(usize::try_from(len).map_err(|_| Unread)?)
    }

    #[inline]
    fn double(&mut self) -> Result<f64, Unread> {
        let bytes = self.take(8)?;
        Ok(f64::from_le_bytes(bytes.try_into().map_err(|_| Unread)?))
    }

    /// An unknown field, not a group (the fast check leaves groups to prost, which bounds their
    /// nesting).
    fn skip(&mut self, wire_type: u8) -> Result<(), Unread> {
        match wire_type {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            DELIMITED => self.bytes().map(drop),
            FIXED32 => self.take(4).map(drop),
            _ => Err(Unread),
        }
    }

    /// An unknown field of checked input, groups included.
    fn skip_checked(&mut self, tag: u32, wire_type: u8) -> Result<(), Unread> {
        if wire_type != START_GROUP {
            return self.skip(wire_type);
        }
        loop {
            match self.key()? {
                (end, END_GROUP) => return if end == tag { Ok(()) } else { Err(Unread) },
                (inner, wire_type) => self.skip_checked(inner, wire_type)?,
            }
        }
    }
}

#[inline]
fn text(bytes: &[u8]) -> Result<&str, Unread> {
    std::str::from_utf8(bytes).map_err(|_| Unread)
}

#[inline]
fn check_text(bytes: &[u8]) -> Result<(), Unread> {
    if bytes.is_ascii() {
        Ok(())
    } else {
        text(bytes).map(drop)
    }
}

// The fast check: what prost would decode, read from the slice.

fn check_struct(mut r: Reader<'_>, depth: u32) -> Result<(), Unread> {
    while !r.is_empty() {
        match r.key()? {
            (1, DELIMITED) => check_entry(Reader(r.bytes()?), depth)?,
            (1, _) => return Err(Unread),
            (_, wire_type) => r.skip(wire_type)?,
        }
    }
    Ok(())
}

fn check_entry(mut r: Reader<'_>, depth: u32) -> Result<(), Unread> {
    while !r.is_empty() {
        match r.key()? {
            (1, DELIMITED) => check_text(r.bytes()?)?,
            (2, DELIMITED) => check_value(Reader(r.bytes()?), depth)?,
            (1 | 2, _) => return Err(Unread),
            (_, wire_type) => r.skip(wire_type)?,
        }
    }
    Ok(())
}

fn check_value(mut r: Reader<'_>, depth: u32) -> Result<(), Unread> {
    if depth >= FAST_DEPTH {
        return Err(Unread);
    }
    while !r.is_empty() {
        match r.key()? {
            (1 | 4, VARINT) => r.varint().map(drop)?,
            (2, FIXED64) => r.double().map(drop)?,
            (3, DELIMITED) => check_text(r.bytes()?)?,
            (5, DELIMITED) => check_struct(Reader(r.bytes()?), depth + 1)?,
            (6, DELIMITED) => check_list(Reader(r.bytes()?), depth + 1)?,
            (1..=6, _) => return Err(Unread),
            (_, wire_type) => r.skip(wire_type)?,
        }
    }
    Ok(())
}

fn check_list(mut r: Reader<'_>, depth: u32) -> Result<(), Unread> {
    while !r.is_empty() {
        match r.key()? {
            (1, DELIMITED) => check_value(Reader(r.bytes()?), depth)?,
            (1, _) => return Err(Unread),
            (_, wire_type) => r.skip(wire_type)?,
        }
    }
    Ok(())
}

// The writing: a `Struct`'s fields into `out` (each entry a key; a later one wins).

fn write_fields<'a>(mut r: Reader<'a>, out: &mut Object<'a>) -> Result<(), Unread> {
    while !r.is_empty() {
        match r.key()? {
            (1, DELIMITED) => write_entry(Reader(r.bytes()?), out)?,
            (tag, wire_type) => r.skip_checked(tag, wire_type)?,
        }
    }
    Ok(())
}

fn write_entry<'a>(r: Reader<'a>, out: &mut Object<'a>) -> Result<(), Unread> {
    // The usual layout, a key then a value and nothing else: one pass.
    let mut fast = r;
    if matches!(fast.key(), Ok((1, DELIMITED))) {
        let key = fast.bytes()?;
        if matches!(fast.key(), Ok((2, DELIMITED))) {
            let value = fast.bytes()?;
            if fast.is_empty() {
                let key = match out.admit(key) {
                    Admit::Key(key) => key,
                    Admit::Every => text(key)?,
                    Admit::Skip => return Ok(()),
                };
                let mut pending = Pending::Empty;
                write_value(Reader(value), &mut pending, out.builder())?;
                out.insert_admitted(key, pending.finish());
                return Ok(());
            }
        }
    }
    // Any other: the key first (it may follow the value, or be repeated); an entry the object
    // does not want (a key no rule reads) is read no further.
    let mut key: &[u8] = b"";
    let mut scan = r;
    while !scan.is_empty() {
        match scan.key()? {
            (1, DELIMITED) => key = scan.bytes()?,
            (tag, wire_type) => scan.skip_checked(tag, wire_type)?,
        }
    }
    if !out.wants(key) {
        return Ok(());
    }
    let key = text(key)?;
    let mut value = Pending::Empty;
    let mut r = r;
    while !r.is_empty() {
        match r.key()? {
            (2, DELIMITED) => write_value(Reader(r.bytes()?), &mut value, out.builder())?,
            (tag, wire_type) => r.skip_checked(tag, wire_type)?,
        }
    }
    out.insert(key, value.finish());
    Ok(())
}

/// A `Value` under construction: a repeated message field merges as protobuf says (objects
/// merge, lists append), any other field replaces it.
enum Pending<'a> {
    Empty,
    Done(Attr<'a>),
    Object(Object<'a>),
    List(List<'a>),
}

impl<'a> Pending<'a> {
    fn finish(self) -> Attr<'a> {
        match self {
            Pending::Empty => Attr::NULL,
            Pending::Done(attr) => attr,
            Pending::Object(object) => object.finish(),
            Pending::List(list) => list.finish(),
        }
    }
}

fn write_value<'a>(mut r: Reader<'a>, value: &mut Pending<'a>, arena: Builder<'a>) -> Result<(), Unread> {
    while !r.is_empty() {
        match r.key()? {
            (1, VARINT) => {
                r.varint()?;
                *value = Pending::Done(Attr::NULL);
            }
            (2, FIXED64) => *value = Pending::Done(Attr::number(r.double()?)),
            (3, DELIMITED) => *value = Pending::Done(Attr::string(text(r.bytes()?)?)),
            (4, VARINT) => *value = Pending::Done(Attr::bool(r.varint()? != 0)),
            (5, DELIMITED) => {
                let mut object = match mem::replace(value, Pending::Empty) {
                    Pending::Object(object) => object,
                    _ => arena.object(),
                };
                write_fields(Reader(r.bytes()?), &mut object)?;
                *value = Pending::Object(object);
            }
            (6, DELIMITED) => {
                let mut list = match mem::replace(value, Pending::Empty) {
                    Pending::List(list) => list,
                    _ => arena.list(),
                };
                write_list(Reader(r.bytes()?), &mut list)?;
                *value = Pending::List(list);
            }
            (tag, wire_type) => r.skip_checked(tag, wire_type)?,
        }
    }
    Ok(())
}

fn write_list<'a>(mut r: Reader<'a>, list: &mut List<'a>) -> Result<(), Unread> {
    while !r.is_empty() {
        match r.key()? {
            (1, DELIMITED) => {
                let mut item = Pending::Empty;
                write_value(Reader(r.bytes()?), &mut item, list.builder())?;
                list.push(item.finish());
            }
            (tag, wire_type) => r.skip_checked(tag, wire_type)?,
        }
    }
    Ok(())
}

// === encoding, from borrowed JSON ===

/// A length-delimited field: key, length, then the body.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn fields_len(map: &Map<String, Value>) -> usize {
    map.iter().map(|(k, v)| delimited_len(1, entry_len(k, v))).sum()
}

fn encode_fields(map: &Map<String, Value>, buf: &mut impl BufMut) {
    for (k, v) in map {
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(entry_len(k, v) as u64, buf);
        encode_entry(k, v, buf);
    }
}

/// A map entry leaves out an empty key, as prost does.
fn entry_len(key: &str, value: &Value) -> usize {
    let key = if key.is_empty() { 0 } else { delimited_len(1, key.len()) };
    key + delimited_len(2, value_len(value))
}

fn encode_entry(key: &str, value: &Value, buf: &mut impl BufMut) {
    if !key.is_empty() {
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(key.len() as u64, buf);
        buf.put_slice(key.as_bytes());
    }
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(value_len(value) as u64, buf);
    encode_value(value, buf);
}

fn value_len(value: &Value) -> usize {
    match value {
        Value::Null => int32::encoded_len(1, &0),
        Value::Number(n) => double::encoded_len(2, &n.as_f64().unwrap_or(0.0)),
        Value::String(s) => string::encoded_len(3, s),
        Value::Bool(b) => encoding::bool::encoded_len(4, b),
        Value::Object(map) => delimited_len(5, fields_len(map)),
        Value::Array(items) => delimited_len(6, list_len(items)),
    }
}

fn encode_value(value: &Value, buf: &mut impl BufMut) {
    match value {
        Value::Null => int32::encode(1, &0, buf),
        Value::Number(n) => double::encode(2, &n.as_f64().unwrap_or(0.0), buf),
        Value::String(s) => string::encode(3, s, buf),
        Value::Bool(b) => encoding::bool::encode(4, b, buf),
        Value::Object(map) => {
            encode_key(5, WireType::LengthDelimited, buf);
            encode_varint(fields_len(map) as u64, buf);
            encode_fields(map, buf);
        }
        Value::Array(items) => {
            encode_key(6, WireType::LengthDelimited, buf);
            encode_varint(list_len(items) as u64, buf);
            encode_list(items, buf);
        }
    }
}

fn list_len(items: &[Value]) -> usize {
    items.iter().map(|v| delimited_len(1, value_len(v))).sum()
}

fn encode_list(items: &[Value], buf: &mut impl BufMut) {
    for v in items {
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(value_len(v) as u64, buf);
        encode_value(v, buf);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use pbjson_types::value::Kind;
    use pbjson_types::{ListValue, Struct};
    use prost::Message;
    use serde_json::json;

    use super::*;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// A document with every kind of value, numbers of every sort, nested.
    fn document() -> Map<String, Value> {
        object(json!({
            "null": null,
            "t": true,
            "f": false,
            "zero": 0,
            "int": 42,
            "neg": -7,
            "frac": 1.5,
            "negfrac": -0.25,
            "big": 9_007_199_254_740_993_u64,
            "huge": 1e300,
            "": "empty key",
            "s": "snow ☃",
            "empty": {},
            "list": [1, "two", null, false, [], {"deep": [{"er": 3.25}]}],
            "nested": {"a": {"b": {"c": [1, 2, {"d": null}]}}},
        }))
    }

    /// What the wire makes of `doc`: every number through a double.
    fn as_sent(doc: &Map<String, Value>) -> Map<String, Value> {
        let mut v = Value::Object(doc.clone());
        as_on_the_wire(&mut v);
        object(v)
    }

    fn pb_value(v: &Value) -> pbjson_types::Value {
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Array(items) => Kind::ListValue(ListValue {
                values: items.iter().map(pb_value).collect(),
            }),
            Value::Object(map) => Kind::StructValue(pb_struct(map)),
        };
        pbjson_types::Value { kind: Some(kind) }
    }

    fn pb_struct(map: &Map<String, Value>) -> Struct {
        Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), pb_value(v))).collect(),
        }
    }

    /// What rules see of a decoded `Struct` (written from its wire form) is what they see of the
    /// JSON it decodes to.
    fn same_context(decoded: &JsonStruct) {
        use vexil_core::context::to_json;
        let map = decoded.to_map();
        let from_json = to_json(&map);
        assert_eq!(to_json(decoded), from_json);
        assert!(from_json.keys().eq(map.keys().filter(|k| *k != "$flagd")));
        // And for a rule that reads only some keys.
        let reads: Vec<Box<str>> = ["", "int", "list", "o", "s", "zz"]
            .into_iter()
            .map(Into::into)
            .collect();
        let some = vexil_core::context::to_json_reading(decoded, Some(&reads));
        assert_eq!(some, vexil_core::context::to_json_reading(&map, Some(&reads)));
        assert!(some.keys().all(|k| reads.iter().any(|r| **r == **k)));
    }

    #[test]
    fn the_wire_form_gives_rules_the_decoded_json() {
        let doc = document();
        let back = JsonStruct::decode(&pb_struct(&doc).encode_to_vec()[..]).unwrap();
        same_context(&back);
        assert_eq!(
            vexil_core::context::to_json(&back)["nested"],
            json!({"a": {"b": {"c": [1, 2, {"d": null}]}}})
        );
        // Repeated keys, and message fields repeated inside one Value (objects merge, lists append).
        let mut entry = Vec::new();
        string::encode(1, &"o".to_owned(), &mut entry);
        for part in [json!({"a": 1, "b": 1}), json!({"b": 2}), json!([1]), json!({"c": 3})] {
            delimited(2, &pb_value(&part).encode_to_vec(), &mut entry);
        }
        let mut bytes =
            pb_struct(&object(json!({"k": 1, "o": "replaced", "$flagd": {"flagKey": "x"}}))).encode_to_vec();
        delimited(1, &entry, &mut bytes);
        bytes.extend(pb_struct(&object(json!({"k": "two"}))).encode_to_vec());
        let back = JsonStruct::decode(&bytes[..]).unwrap();
        assert_eq!(
            Value::Object(back.to_map()),
            json!({"k": "two", "o": {"c": 3}, "$flagd": {"flagKey": "x"}})
        );
        same_context(&back);
        // Re-encoded as received.
        assert_eq!(back.encode_to_vec(), bytes);
    }

    #[test]
    fn the_fast_check_reads_ordinary_input_and_leaves_the_rest_to_prost() {
        let bytes = pb_struct(&document()).encode_to_vec();
        assert!(check_struct(Reader(&bytes), 0).is_ok());
        // Deep nesting and groups are prost's to judge: accepted here only through prost.
        let deep = nested_structs(30);
        assert!(check_struct(Reader(&deep), 0).is_err());
        assert!(JsonStruct::decode(&deep[..]).is_ok());
        // {"a": 1, unknown group 7 {unknown 8: varint 1}, "b": true}: skipped when written.
        let mut bytes = pb_struct(&object(json!({"a": 1}))).encode_to_vec();
        encode_key(7, WireType::StartGroup, &mut bytes);
        encode_key(8, WireType::Varint, &mut bytes);
        encode_varint(1, &mut bytes);
        encode_key(7, WireType::EndGroup, &mut bytes);
        bytes.extend(pb_struct(&object(json!({"b": true}))).encode_to_vec());
        assert!(check_struct(Reader(&bytes), 0).is_err());
        let back = JsonStruct::decode(&bytes[..]).unwrap();
        assert_eq!(Value::Object(back.to_map()), json!({"a": 1, "b": true}));
        same_context(&back);
        // A wrong wire type is malformed for both.
        let bad_number = [0x0a, 0x05, 0x12, 0x03, 0x10, 0x01, 0x00];
        assert!(check_struct(Reader(&bad_number), 0).is_err());
        assert!(JsonStruct::decode(&bad_number[..]).is_err());
        // A map entry sent as a varint (found by fuzzing): prost's generated `Struct` does not
        // check a map field's wire type and reads it as an empty entry; it is malformed here, as
        // it was for the decoder before this one.
        let varint_entry = [0x08, 0x00];
        assert!(Struct::decode(&varint_entry[..]).is_ok());
        assert!(JsonStruct::decode(&varint_entry[..]).is_err());
    }

    #[test]
    fn a_struct_split_across_buffers_decodes_as_a_contiguous_one() {
        let bytes = pb_struct(&document()).encode_to_vec();
        let whole = JsonStruct::decode(&bytes[..]).unwrap();
        for at in [1, 7, bytes.len() / 2, bytes.len() - 1] {
            let (a, b) = bytes.split_at(at);
            let split = JsonStruct::decode(prost::bytes::Buf::chain(a, b)).unwrap();
            assert_eq!(split, whole, "{at}");
            same_context(&split);
        }
    }

    #[test]
    fn round_trip() {
        let doc = document();
        let bytes = JsonStruct::from(doc.clone()).encode_to_vec();
        assert_eq!(bytes.len(), JsonStruct::from(doc.clone()).encoded_len());
        let back = JsonStruct::decode(&bytes[..]).unwrap();
        assert_eq!(back.to_map(), as_sent(&doc));
        // Integral doubles come back as integers, others as floats; beyond 2^53 a float.
        assert_eq!(back.to_map()["int"], json!(42));
        assert!(back.to_map()["int"].is_i64());
        assert_eq!(back.to_map()["neg"], json!(-7));
        assert_eq!(back.to_map()["frac"], json!(1.5));
        assert_eq!(back.to_map()["big"], json!(9_007_199_254_740_992.0));
        assert!(back.to_map()["big"].is_f64());
        // And what came back encodes to the same bytes.
        assert_eq!(back.encode_to_vec(), bytes);
    }

    #[test]
    fn encodes_as_prost_struct_does() {
        let doc = document();
        let ours = JsonStruct::from(doc.clone()).encode_to_vec();
        let theirs = pb_struct(&doc);
        assert_eq!(Struct::decode(&ours[..]).unwrap(), theirs);
        // Entry by entry the bytes are prost's (a map's order is its own).
        for (k, v) in &doc {
            let one: Map<String, Value> = [(k.clone(), v.clone())].into_iter().collect();
            assert_eq!(
                JsonStruct::from(one.clone()).encode_to_vec(),
                pb_struct(&one).encode_to_vec(),
                "{k}"
            );
        }
    }

    #[test]
    fn decodes_what_prost_struct_encodes() {
        let doc = document();
        let bytes = pb_struct(&doc).encode_to_vec();
        assert_eq!(JsonStruct::decode(&bytes[..]).unwrap().into_map(), as_sent(&doc));
    }

    #[test]
    fn numbers_convert_as_before() {
        let cases = [
            (0.0, json!(0)),
            (-0.0, json!(0)),
            (3.0, json!(3)),
            (-3.0, json!(-3)),
            (0.5, json!(0.5)),
            (9_007_199_254_740_991.0, json!(9_007_199_254_740_991_i64)),
            (9_007_199_254_740_992.0, json!(9_007_199_254_740_992.0)),
            (-1e20, json!(-1e20)),
            (f64::NAN, Value::Null),
            (f64::INFINITY, Value::Null),
            (f64::NEG_INFINITY, Value::Null),
        ];
        for (n, expected) in cases {
            let s = Struct {
                fields: HashMap::from([(
                    "n".to_owned(),
                    pbjson_types::Value {
                        kind: Some(Kind::NumberValue(n)),
                    },
                )]),
            };
            let back = JsonStruct::decode(&s.encode_to_vec()[..]).unwrap();
            same_context(&back);
            assert_eq!(back.to_map()["n"], expected, "{n}");
            assert_eq!(back.to_map()["n"].is_f64(), expected.is_f64(), "{n}");
        }
    }

    #[test]
    fn a_later_key_wins_and_messages_merge_as_protobuf_does() {
        let first = pb_struct(&object(json!({"k": 1, "o": {"a": 1}, "l": [1]}))).encode_to_vec();
        let second = pb_struct(&object(json!({"k": "two"}))).encode_to_vec();
        let bytes = [first, second].concat();
        let back = JsonStruct::decode(&bytes[..]).unwrap();
        assert_eq!(
            Value::Object(back.into_map()),
            json!({"k": "two", "o": {"a": 1}, "l": [1]})
        );
        // Inside one Value, a repeated struct_value merges and list_value appends (as prost does).
        let mut value = Vec::new();
        for part in [json!({"a": 1}), json!({"b": 2})] {
            value.extend(pb_value(&part).encode_to_vec());
        }
        for part in [json!([1]), json!([2])] {
            value.extend(pb_value(&part).encode_to_vec());
        }
        let theirs = pbjson_types::Value::decode(&value[..]).unwrap();
        let mut ours = JsonValue::default();
        ours.merge(&value[..]).unwrap();
        assert_eq!(ours.0, json!([1, 2]));
        assert_eq!(theirs, pb_value(&json!([1, 2])));
        let mut objects = Vec::new();
        for part in [json!({"a": 1}), json!({"b": 2})] {
            objects.extend(pb_value(&part).encode_to_vec());
        }
        let mut ours = JsonValue::default();
        ours.merge(&objects[..]).unwrap();
        assert_eq!(ours.0, json!({"a": 1, "b": 2}));
        assert_eq!(
            pbjson_types::Value::decode(&objects[..]).unwrap(),
            pb_value(&json!({"a": 1, "b": 2}))
        );
    }

    /// `body` as a length-delimited field `tag`.
    fn delimited(tag: u32, body: &[u8], buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(body.len() as u64, buf);
        buf.extend(body);
    }

    #[test]
    fn empty_values_are_null_and_unknown_fields_are_skipped() {
        let mut bytes = Vec::new();
        // An unknown Struct field.
        encode_key(9, WireType::Varint, &mut bytes);
        encode_varint(5, &mut bytes);
        // {key "a", unknown 9: "x", value: {}}
        let mut entry = Vec::new();
        string::encode(1, &"a".to_owned(), &mut entry);
        string::encode(9, &"x".to_owned(), &mut entry);
        delimited(2, &[], &mut entry);
        delimited(1, &entry, &mut bytes);
        // {key "b", value: {unknown 7: 1.0}}
        let mut value = Vec::new();
        double::encode(7, &1.0, &mut value);
        let mut entry = Vec::new();
        string::encode(1, &"b".to_owned(), &mut entry);
        delimited(2, &value, &mut entry);
        delimited(1, &entry, &mut bytes);
        // {value: "no key"}: the empty key.
        let mut entry = Vec::new();
        delimited(2, &pb_value(&json!("no key")).encode_to_vec(), &mut entry);
        delimited(1, &entry, &mut bytes);
        let back = JsonStruct::decode(&bytes[..]).unwrap();
        same_context(&back);
        assert_eq!(
            Value::Object(back.into_map()),
            json!({"a": null, "b": null, "": "no key"})
        );
        assert_eq!(Struct::decode(&bytes[..]).unwrap().fields.len(), 3);
    }

    /// Bytes built back to front (each level's length is what is already built), reversed.
    struct Backwards(Vec<u8>);

    impl Backwards {
        fn prepend(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
            let mut head = Vec::new();
            f(&mut head);
            self.0.extend(head.iter().rev());
        }

        /// Wraps everything so far in a length-delimited field `tag`.
        fn wrap(&mut self, tag: u32) {
            let len = self.0.len() as u64;
            self.prepend(|head| {
                encode_key(tag, WireType::LengthDelimited, head);
                encode_varint(len, head);
            });
        }

        fn bytes(mut self) -> Vec<u8> {
            self.0.reverse();
            self.0
        }
    }

    /// `depth` levels of `{"k": {"k": …}}`.
    fn nested_structs(depth: usize) -> Vec<u8> {
        let mut b = Backwards(Vec::new());
        for _ in 0..depth {
            b.wrap(5); // Value.struct_value
            b.wrap(2); // entry value
            b.prepend(|head| string::encode(1, &"k".to_owned(), head));
            b.wrap(1); // Struct.fields
        }
        b.bytes()
    }

    /// `{"k": [[[…]]]}`, `depth` lists deep.
    fn nested_lists(depth: usize) -> Vec<u8> {
        let mut b = Backwards(Vec::new());
        b.wrap(6); // Value.list_value: []
        for _ in 0..depth {
            b.wrap(1); // ListValue.values
            b.wrap(6); // Value.list_value
        }
        b.wrap(2);
        b.prepend(|head| string::encode(1, &"k".to_owned(), head));
        b.wrap(1);
        b.bytes()
    }

    #[test]
    fn deep_nesting_is_an_error_at_prosts_limit() {
        let ok = nested_structs(33);
        assert_eq!(JsonStruct::decode(&ok[..]).unwrap().encode_to_vec(), ok);
        assert!(Struct::decode(&ok[..]).is_ok());
        for depth in [34, 10_000] {
            let bytes = nested_structs(depth);
            assert!(JsonStruct::decode(&bytes[..]).is_err(), "{depth}");
            assert!(Struct::decode(&bytes[..]).is_err(), "{depth}");
        }
        let lists = nested_lists(10_000);
        assert!(JsonStruct::decode(&lists[..]).is_err());
        assert!(Struct::decode(&lists[..]).is_err());
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error() {
        let bytes = JsonStruct::from(document()).encode_to_vec();
        for end in 1..bytes.len() {
            let ours = JsonStruct::decode(&bytes[..end]);
            let theirs = Struct::decode(&bytes[..end]);
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{end}");
        }
        for garbage in [
            &[0xff][..],
            &[0x0a, 0x05, 0x12],
            &[0x0a, 0x02, 0x12, 0x7f],
            &[0x0b],
            &[0x0a; 16],
        ] {
            assert!(JsonStruct::decode(garbage).is_err(), "{garbage:?}");
        }
        // A number with the wrong wire type, a string that is not UTF-8.
        let bad_number = [0x0a, 0x05, 0x12, 0x03, 0x10, 0x01, 0x00];
        assert!(JsonStruct::decode(&bad_number[..]).is_err());
        let bad_string = [0x0a, 0x05, 0x12, 0x03, 0x1a, 0x01, 0xff];
        assert!(JsonStruct::decode(&bad_string[..]).is_err());
    }

    #[test]
    fn serde_is_the_plain_json_object() {
        let doc = object(json!({"a": [1, 2.5, null], "b": {"c": true}}));
        assert_eq!(
            serde_json::to_value(JsonStruct::from(doc.clone())).unwrap(),
            Value::Object(doc.clone())
        );
        let back: JsonStruct = serde_json::from_value(json!({"a": [1.0, 2.5, null], "b": {"c": true}})).unwrap();
        assert_eq!(back.to_map(), doc);
        assert!(serde_json::from_value::<JsonStruct>(json!([1])).is_err());
    }
}
