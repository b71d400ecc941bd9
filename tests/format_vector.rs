//! The worked test vector of docs/FORMAT.md, checked against the code: the hex in the
//! document is parsed from the document itself, so the two cannot drift apart.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use tokenguard::seal::{self, RecordHeader};
use tokenguard::{Metadata, Secret, SecretKind, TokenState};

fn doc_value(doc: &str, name: &str) -> Vec<u8> {
    let marker = format!("{name}:");
    let start = doc
        .find(&format!("```hex {name}"))
        .map(|i| i + 8 + name.len())
        .or_else(|| doc.find(&marker).map(|i| i + marker.len()));
    let start = start.unwrap_or_else(|| panic!("{name} not in FORMAT.md"));
    let rest = &doc[start..];
    let end = rest.find("```").unwrap();
    let hex: String = rest[..end].chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn header() -> RecordHeader {
    let mut labels = BTreeMap::new();
    labels.insert("owner".to_string(), "alice".to_string());
    RecordHeader {
        provider: "github".into(),
        name: "ci-bot".into(),
        dek_version: 1,
        meta: Metadata {
            created: 1_700_000_000,
            updated: 1_700_000_000,
            expires_at: Some(1_700_028_800),
            state: TokenState::Active,
            kind: SecretKind::Raw,
            token_type: None,
            scopes: vec![],
            labels,
        },
    }
}

const DEK: [u8; 32] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12,
    0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];
const STORE_ID: [u8; 16] =
    [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf];
const NONCE: [u8; 12] = [0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xbb];

#[test]
fn record_vector_matches_the_document() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md")).unwrap();
    let record = seal::seal_record_for_test_vector(
        &DEK,
        &STORE_ID,
        &header(),
        &Secret::raw(b"ghp_exampletoken".to_vec()),
        NONCE,
    )
    .unwrap();
    if std::env::var("TG_PRINT_VECTOR").is_ok() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let header_len = record.len() - 12 - 4 - (1 + 16 + 16);
        println!("record: {}", hex(&record));
        println!("aad: {}", hex(&seal::record_aad(&STORE_ID, &record[..header_len])));
    }
    assert_eq!(record, doc_value(&doc, "record"), "record bytes differ from docs/FORMAT.md");
    let header_len = record.len() - 12 - 4 - (1 + 16 + 16);
    assert_eq!(seal::record_aad(&STORE_ID, &record[..header_len]), doc_value(&doc, "aad"));
    let (h, s) = seal::open_record_with_key(&DEK, &STORE_ID, &record).unwrap();
    assert_eq!(h, header());
    assert_eq!(s.field(None).unwrap().expose(), b"ghp_exampletoken");
}

#[test]
fn aes_kw_vector_matches_rfc3394() {
    // RFC 3394 §4.6: 256 bits of key data with a 256-bit KEK. The soft root and the
    // PKCS#11 CKM_AES_KEY_WRAP produce exactly this format.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md")).unwrap();
    let kek: [u8; 32] = doc_value(&doc, "kek").try_into().unwrap();
    let key = doc_value(&doc, "key-data");
    let want = doc_value(&doc, "wrapped");
    use aes_kw::KeyInit;
    let kw = aes_kw::KwAes256::new(&kek.into());
    let mut out = [0u8; 40];
    assert_eq!(kw.wrap_key(&key, &mut out).unwrap(), want.as_slice());
}

/// The recovery-share vector of docs/FORMAT.md: the two shares, read from the
/// document, rebuild the identity of the recipient they name, and a share of it with
/// one changed field is rejected.
#[test]
fn recovery_share_vector_matches_the_document() {
    use tokenguard::recovery::{Share, combine};
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md")).unwrap();
    let block = |name: &str| {
        let start = doc.find(&format!("```text {name}\n")).unwrap() + 9 + name.len();
        let len = doc[start..].find("```").unwrap();
        doc[start..start + len].to_string()
    };
    let (ana, cho) = (block("share-ana"), block("share-cho"));
    let recipient = ana.lines().find_map(|l| l.strip_prefix("recipient: ")).unwrap();
    let id = combine(&[Share::parse(ana.as_bytes()).unwrap(), Share::parse(cho.as_bytes()).unwrap()]).unwrap();
    assert_eq!(id.recipient(), recipient);
    let moved = cho.replace("custodian: cho", "custodian: chu");
    let e = combine(&[Share::parse(ana.as_bytes()).unwrap(), Share::parse(moved.as_bytes()).unwrap()]).unwrap_err();
    assert_eq!(e.exit_code(), 4, "{e}");
}
