//! Range reads against a server answering any status, `Content-Range` and body: the client
//! returns exactly the bytes asked for, from the offset asked for, or an error; never a panic
//! (a range ending at `u64::MAX` once overflowed its length check).

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use proptest::prelude::*;
use streamsnap_format::Digest;
use streamsnap_registry::{Client, Repository};

use crate::common::{Server, client, full, respond};
use crate::config;

#[derive(Clone, Debug, Default)]
struct Answer {
    status: u16,
    content_range: String,
    body: Bytes,
}

struct Rig {
    runtime: tokio::runtime::Runtime,
    _server: Server,
    answer: Arc<Mutex<Answer>>,
    client: Client,
    repo: Repository,
}

/// One server for every case: each sets the answer it wants.
fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let answer = Arc::new(Mutex::new(Answer::default()));
        let served = answer.clone();
        let server = runtime.block_on(Server::start(move |_| {
            let answer = served.lock().unwrap().clone();
            respond(
                answer.status,
                &[("content-range", &answer.content_range)],
                full(answer.body),
            )
        }));
        let repo = Repository::new(server.registry(), "a/b");
        let client = runtime.block_on(async { client(|_| {}) });
        Rig {
            runtime,
            _server: server,
            answer,
            client,
            repo,
        }
    })
}

fn position() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 0u64..64, 1 => Just(u64::MAX), 1 => Just(u64::MAX - 1), 1 => any::<u64>()]
}

fn content_range(offset: u64, len: u64) -> impl Strategy<Value = String> {
    let near = move |base: u64| {
        prop_oneof![
            Just(base),
            (0u64..4).prop_map(move |d| base.saturating_add(d)),
            (0u64..4).prop_map(move |d| base.saturating_sub(d)),
            position(),
        ]
    };
    let last = offset.saturating_add(len.saturating_sub(1));
    prop_oneof![
        6 => (near(offset), near(last), prop::option::of(near(last.saturating_add(1))))
            .prop_map(|(a, b, total)| match total {
                Some(total) => format!("bytes {a}-{b}/{total}"),
                None => format!("bytes {a}-{b}/*"),
            }),
        1 => "[bytes 0-9/*]{0,16}",
    ]
}

fn case() -> impl Strategy<Value = (u64, u64, u16, String, Vec<u8>)> {
    (
        prop_oneof![4 => 0u64..40, 1 => position()],
        prop_oneof![4 => 1u64..40, 1 => position()],
    )
        .prop_flat_map(|(offset, len)| {
            (
                Just(offset),
                Just(len),
                prop::sample::select(&[206u16, 206, 206, 200, 416, 500][..]),
                content_range(offset, len),
                prop::collection::vec(any::<u8>(), 0..100),
            )
        })
}

proptest! {
    #![proptest_config(config(8192))]

    #[test]
    fn range_reads_return_the_bytes_asked_for_or_fail((offset, len, status, content_range, body) in case()) {
        let rig = rig();
        let body = Bytes::from(body);
        *rig.answer.lock().unwrap() = Answer { status, content_range, body: body.clone() };
        let digest = Digest::sha256(b"blob");
        let result = rig.runtime.block_on(rig.client.read_range(&rig.repo, &digest, offset, len));
        if let Ok(got) = result {
            prop_assert_eq!(got.len() as u64, len);
            if len > 0 {
                let start = if status == 200 { offset as usize } else { 0 };
                prop_assert_eq!(&got[..], &body[start..start + len as usize]);
            }
        }
    }
}

/// Found by the property above: a read of a huge length reserved all of it before the body
/// came (an abort: "memory allocation of 5959573773615658479 bytes failed"), and a 200 for a
/// range ending at `u64::MAX` overflowed its end. Now the body decides what is reserved.
#[test]
fn seed_a_huge_range_is_refused_without_reserving_it() {
    let rig = rig();
    let digest = Digest::sha256(b"blob");
    for (offset, len, status, content_range) in [
        (
            0,
            5_959_573_773_615_658_479,
            206,
            "bytes 0-5959573773615658478/*".to_owned(),
        ),
        (7, u64::MAX - 7, 206, format!("bytes 7-{}/*", u64::MAX - 1)),
        (1, u64::MAX, 200, String::new()),
        (u64::MAX, 1, 200, String::new()),
    ] {
        *rig.answer.lock().unwrap() = Answer {
            status,
            content_range,
            body: Bytes::from_static(b"short body"),
        };
        let result = rig
            .runtime
            .block_on(rig.client.read_range(&rig.repo, &digest, offset, len));
        assert!(result.is_err(), "{offset}+{len}: {result:?}");
    }
}
