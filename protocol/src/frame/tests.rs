//! The codec against the golden vectors both languages share, and its edges.

use super::*;
use serde_json::Value;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/frames.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn frame_from_json(v: &Value) -> Frame {
    let text = |x: &Value| Bytes::from(x.as_str().unwrap().as_bytes().to_vec());
    match v["kind"].as_str().unwrap() {
        "ready" => Frame::Ready {
            pid: v["pid"].as_u64().unwrap() as u32,
            reads_ids: v["reads_ids"].as_bool().unwrap_or(false),
            reads_edges: v["reads_edges"].as_bool().unwrap_or(false),
        },
        "batch" => Frame::Batch {
            id: v["id"].as_u64().unwrap(),
            items: v["items"].as_array().unwrap().iter().map(text).collect(),
            ids: v
                .get("ids")
                .map(|ids| {
                    ids.as_array()
                        .unwrap()
                        .iter()
                        .map(|pair| ItemIds {
                            request_id: text(&pair[0]),
                            trace_id: text(&pair[1]),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            edges: v
                .get("edges")
                .map(|edges| {
                    edges
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e.as_u64().unwrap() as u8)
                        .collect()
                })
                .unwrap_or_default(),
        },
        "results" => Frame::Results {
            id: v["id"].as_u64().unwrap(),
            items: v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|it| ItemResult {
                    status: it["status"]
                        .as_str()
                        .unwrap()
                        .parse::<Outcome>()
                        .unwrap()
                        .try_into()
                        .unwrap(),
                    body: text(&it["body"]),
                })
                .collect(),
        },
        "stream" => Frame::Stream {
            id: v["id"].as_u64().unwrap(),
            index: v["index"].as_u64().unwrap() as u32,
            body: text(&v["body"]),
        },
        "cancel" => Frame::Cancel {
            id: v["id"].as_u64().unwrap(),
            index: v["index"].as_u64().unwrap() as u32,
        },
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn golden_vectors_encode_and_decode() {
    let g = golden();
    for case in g["valid"].as_array().unwrap() {
        let bytes = hex(case["hex"].as_str().unwrap());
        let frame = frame_from_json(&case["frame"]);
        assert_eq!(frame.to_bytes().as_ref(), &bytes[..], "{}", case["name"]);
        assert_eq!(
            Frame::check(&bytes, DEFAULT_MAX_FRAME),
            Ok(Some(bytes.len()))
        );
        assert_eq!(Frame::parse(&bytes).unwrap(), frame, "{}", case["name"]);
    }
}

#[test]
fn golden_invalid_vectors_are_rejected() {
    let g = golden();
    let max = g["max_frame"].as_u64().unwrap() as usize;
    for case in g["invalid"].as_array().unwrap() {
        let bytes = hex(case["hex"].as_str().unwrap());
        let name = case["name"].as_str().unwrap();
        let result = Frame::check(&bytes, max).and_then(|n| match n {
            Some(n) => Frame::parse(&bytes[..n]).map(|_| ()),
            None => Err(FrameError::Malformed("incomplete")),
        });
        assert!(result.is_err(), "{name} was accepted");
    }
}

#[test]
fn partial_frames_need_more_bytes() {
    let bytes = Frame::Batch {
        id: 7,
        items: vec![Bytes::from_static(b"abc")],
        ids: vec![ItemIds::default()],
        edges: vec![EDGE_LAST],
    }
    .to_bytes();
    for cut in 0..bytes.len() {
        assert_eq!(Frame::check(&bytes[..cut], DEFAULT_MAX_FRAME), Ok(None));
    }
}

#[test]
fn parse_rejects_what_check_would_not_have_sized() {
    let ready = Frame::Ready {
        pid: 9,
        reads_ids: false,
        reads_edges: false,
    }
    .to_bytes();
    for cut in 0..ready.len() {
        assert!(Frame::parse(&ready[..cut]).is_err(), "cut at {cut}");
    }
    let mut longer = ready.to_vec();
    longer.push(0);
    assert!(Frame::parse(&longer).is_err());
    assert_eq!(Frame::parse(&[0, 0, 0, 0]), Err(FrameError::Empty));
}

#[test]
fn item_statuses_are_the_four_a_worker_can_report() {
    for code in 0..=3 {
        let status = ItemStatus::from_code(code).unwrap();
        assert_eq!(status.code(), code);
        assert_eq!(ItemStatus::try_from(Outcome::from(status)), Ok(status));
    }
    assert_eq!(ItemStatus::from_code(4), None);
    for agent_only in [Outcome::Timeout, Outcome::Overloaded, Outcome::Unavailable] {
        assert_eq!(ItemStatus::try_from(agent_only), Err(agent_only));
    }
}

#[test]
fn oversized_length_is_rejected_before_allocation() {
    let bytes = [0xff, 0xff, 0xff, 0xff];
    assert_eq!(
        Frame::check(&bytes, 1024),
        Err(FrameError::TooLarge {
            len: 0xffff_ffff,
            max: 1024
        })
    );
}
