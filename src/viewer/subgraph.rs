//! A graph's subgraph (`qParams`: pinned nodes and supernodes) checked and saved back into its file, as
//! circuit-tracer's local server does for its frontend (`POST /save_graph/{slug}`).
//!
//! The file is rewritten with only `qParams` replaced: every other top-level value (`metadata`, `nodes`,
//! `links`, anything else) is copied byte for byte ([`serde_json::value::RawValue`]: no number is parsed and
//! printed again), in its order, and the new file replaces the old one atomically, so a reader sees one or
//! the other. The `qParams` fields the viewer reads are checked against the graph: `pinnedIds` (a list of
//! node ids, or Neuronpedia's comma-separated string), `supernodes` (lists `[label, node id, …]`) and
//! `clickedId` (empty or a node id); other fields (`linkType`, `sg_pos`, …) are kept as sent.

use crate::clt::checkpoint::write_atomic;
use crate::{Error, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::HashSet;
use std::path::Path;

/// A JSON object's members in file order, each value as its original text.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry::<String, Box<RawValue>>()? {
                    out.push(kv);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Only what identifies a node.
#[derive(serde::Deserialize)]
struct NodeId {
    node_id: String,
}

/// The node ids of a pinned list: a JSON list of strings, or a comma-separated string (Neuronpedia's URL
/// form); `what` names the field in errors.
fn id_list(v: &Value, what: &str) -> Result<Vec<String>> {
    let bad = |reason: String| Error::InvalidData {
        what: what.into(),
        reason,
    };
    match v {
        Value::String(s) => Ok(s
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| bad(format!("entry {i} is not a string")))
            })
            .collect(),
        _ => Err(bad(
            "neither a list of node ids nor a comma-separated string".into(),
        )),
    }
}

/// Checks `q` (a graph's `qParams`) against the graph's node ids: every pinned id, every supernode member
/// and `clickedId` must name a node; each supernode is `[label, id, …]` with a string label. Returns the
/// number of pinned nodes and of supernodes.
pub fn check_qparams(q: &Value, ids: &HashSet<&str>) -> Result<(usize, usize)> {
    let obj = q.as_object().ok_or_else(|| Error::InvalidData {
        what: "qParams".into(),
        reason: "not a JSON object".into(),
    })?;
    let unknown = |what: String, id: &str| Error::InvalidData {
        what,
        reason: format!("{id:?} is not a node of this graph"),
    };
    let mut pinned = 0;
    if let Some(p) = obj.get("pinnedIds") {
        let list = id_list(p, "qParams.pinnedIds")?;
        if let Some(id) = list.iter().find(|id| !ids.contains(id.as_str())) {
            return Err(unknown("qParams.pinnedIds".into(), id));
        }
        pinned = list.len();
    }
    let mut groups = 0;
    if let Some(s) = obj.get("supernodes") {
        let list = s.as_array().ok_or_else(|| Error::InvalidData {
            what: "qParams.supernodes".into(),
            reason: "not a list".into(),
        })?;
        for (i, g) in list.iter().enumerate() {
            let what = format!("qParams.supernodes[{i}]");
            let parts = g.as_array().filter(|a| !a.is_empty());
            let parts = parts.ok_or_else(|| Error::InvalidData {
                what: what.clone(),
                reason: "not a list [label, node id, …]".into(),
            })?;
            if !parts[0].is_string() {
                return Err(Error::InvalidData {
                    what,
                    reason: "its first entry (the label) is not a string".into(),
                });
            }
            let members = id_list(&Value::Array(parts[1..].to_vec()), &what)?;
            if let Some(id) = members.iter().find(|id| !ids.contains(id.as_str())) {
                return Err(unknown(what, id));
            }
        }
        groups = list.len();
    }
    match obj.get("clickedId") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if id.is_empty() || ids.contains(id.as_str()) => {}
        Some(Value::String(id)) => return Err(unknown("qParams.clickedId".into(), id)),
        Some(_) => {
            return Err(Error::InvalidData {
                what: "qParams.clickedId".into(),
                reason: "not a string".into(),
            });
        }
    }
    Ok((pinned, groups))
}

/// The graph file `text` with its `qParams` replaced by `q` (checked first with [`check_qparams`]; added
/// after `metadata`, or first, when the file has none), every other member unchanged. `name` names the
/// file in errors. Returns the new text and [`check_qparams`]'s counts.
pub fn with_qparams(text: &str, name: &str, q: &Value) -> Result<(String, (usize, usize))> {
    let bad = |reason: String| Error::InvalidData {
        what: format!("graph {name}"),
        reason,
    };
    let Members(mut members) =
        serde_json::from_str(text).map_err(|e| bad(format!("not a JSON object: {e}")))?;
    let nodes = members
        .iter()
        .find(|(k, _)| k == "nodes")
        .ok_or_else(|| bad("it has no `nodes`".into()))?;
    let nodes: Vec<NodeId> = serde_json::from_str(nodes.1.get())
        .map_err(|e| bad(format!("`nodes` is not a list of nodes with ids: {e}")))?;
    let ids: HashSet<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
    let counts = check_qparams(q, &ids)?;
    let raw = RawValue::from_string(q.to_string()).map_err(|e| bad(e.to_string()))?;
    match members.iter().position(|(k, _)| k == "qParams") {
        Some(i) => members[i].1 = raw,
        None => {
            let at = members
                .iter()
                .position(|(k, _)| k == "metadata")
                .map_or(0, |i| i + 1);
            members.insert(at, ("qParams".into(), raw));
        }
    }
    let mut out = String::with_capacity(text.len() + 64);
    out.push('{');
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(k).map_err(|e| bad(e.to_string()))?);
        out.push(':');
        out.push_str(v.get());
    }
    out.push_str("}\n");
    Ok((out, counts))
}

/// Replaces the `qParams` of the graph file at `path` ([`with_qparams`]), atomically.
pub fn save_qparams(path: &Path, name: &str, q: &Value) -> Result<(usize, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (out, counts) = with_qparams(&text, name, q)?;
    write_atomic(path, out.as_bytes())?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GRAPH: &str = "{\n \"metadata\": {\"prompt\": \"a b\", \"x\": 0.10000000149011612},\n \
        \"qParams\": {\"pinnedIds\": [], \"supernodes\": []},\n \"nodes\": [{\"node_id\": \"E_1_0\", \
        \"activation\": 1e-7}, {\"node_id\": \"0_3_1\"}, {\"node_id\": \"2_9_1\"}],\n \
        \"links\": [{\"source\": \"E_1_0\", \"target\": \"0_3_1\", \"weight\": 0.30000001192092896}]\n}\n";

    #[test]
    fn only_qparams_changes_and_every_other_byte_is_kept() {
        let q = json!({"pinnedIds": ["0_3_1", "2_9_1"], "supernodes": [["pair", "0_3_1", "2_9_1"]],
                       "linkType": "both", "clickedId": "0_3_1", "sg_pos": "1,2"});
        let (out, counts) = with_qparams(GRAPH, "g.json", &q).unwrap();
        assert_eq!(counts, (2, 1));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["qParams"], q);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        // (serde_json's map sorts keys; the order in the text is checked below.)
        assert_eq!(keys.len(), 4);
        let at = |k: &str| out.find(&format!("\"{k}\":")).unwrap();
        assert!(
            at("metadata") < at("qParams")
                && at("qParams") < at("nodes")
                && at("nodes") < at("links")
        );
        // The numbers' text is untouched (a parse and print would write 0.1 and 1e-7 otherwise).
        for raw in [
            "{\"prompt\": \"a b\", \"x\": 0.10000000149011612}",
            "\"activation\": 1e-7}",
            "\"weight\": 0.30000001192092896}]",
        ] {
            assert!(out.contains(raw), "{raw} was rewritten: {out}");
        }
        // A file with no qParams gets one after its metadata.
        let bare = GRAPH.replace(
            " \"qParams\": {\"pinnedIds\": [], \"supernodes\": []},\n",
            "",
        );
        let (out, _) = with_qparams(&bare, "g.json", &json!({"pinnedIds": "E_1_0"})).unwrap();
        assert!(
            out.starts_with("{\"metadata\":{\"prompt\": \"a b\""),
            "{out}"
        );
        assert!(
            out.contains("},\"qParams\":{\"pinnedIds\":\"E_1_0\"},\"nodes\":"),
            "{out}"
        );
    }

    #[test]
    fn qparams_naming_other_nodes_or_malformed_are_refused() {
        for (q, want) in [
            (json!([]), "not a JSON object"),
            (
                json!({"pinnedIds": ["0_3_1", "5_5_5"]}),
                "\"5_5_5\" is not a node",
            ),
            (
                json!({"pinnedIds": "0_3_1,5_5_5"}),
                "\"5_5_5\" is not a node",
            ),
            (json!({"pinnedIds": [3]}), "entry 0 is not a string"),
            (json!({"pinnedIds": 3}), "neither a list"),
            (json!({"supernodes": {}}), "not a list"),
            (
                json!({"supernodes": [["ok", "0_3_1"], []]}),
                "supernodes[1]",
            ),
            (
                json!({"supernodes": [[7, "0_3_1"]]}),
                "label) is not a string",
            ),
            (
                json!({"supernodes": [["g", "0_3_1", "9_9_9"]]}),
                "\"9_9_9\" is not a node",
            ),
            (json!({"supernodes": [["g", 4]]}), "entry 0 is not a string"),
            (json!({"clickedId": "nope"}), "\"nope\" is not a node"),
            (json!({"clickedId": 1}), "not a string"),
        ] {
            let e = with_qparams(GRAPH, "g.json", &q).unwrap_err().to_string();
            assert!(e.contains(want), "{q}: {e}");
        }
        for (text, want) in [
            ("[1]", "not a JSON object"),
            ("{\"links\": []}", "no `nodes`"),
            ("{\"nodes\": [{\"id\": 1}]}", "not a list of nodes"),
            ("{\"nodes\": [", "not a JSON object"),
        ] {
            let e = with_qparams(text, "g.json", &json!({}))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("graph g.json") && e.contains(want),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn saving_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.json");
        std::fs::write(&path, GRAPH).unwrap();
        let q = json!({"pinnedIds": ["E_1_0"], "supernodes": []});
        assert_eq!(save_qparams(&path, "g.json", &q).unwrap(), (1, 0));
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["qParams"], q);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["g.json"]);
        // A refused update leaves the file as it was.
        let before = std::fs::read(&path).unwrap();
        assert!(save_qparams(&path, "g.json", &json!({"pinnedIds": ["x"]})).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
