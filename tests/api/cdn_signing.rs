//! Signed stream URLs checked against an independent implementation:
//! botocore's `CloudFrontSigner`, signing with the openssl command line.

use std::process::Command;

use serde_json::Value;

use crate::helpers::spawn_app_with;
use crate::support::require_binary;

const BOTOCORE_SIGN: &str = r#"
import datetime, subprocess, sys
from botocore.signers import CloudFrontSigner
key_file, key_id, url, expires = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def rsa_signer(message):
    return subprocess.run(["openssl", "dgst", "-sha1", "-sign", key_file],
                          input=message, capture_output=True, check=True).stdout
signer = CloudFrontSigner(key_id, rsa_signer)
when = datetime.datetime.fromtimestamp(expires, tz=datetime.timezone.utc)
print(signer.generate_presigned_url(url, date_less_than=when))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_match_botocore() {
    let openssl = require_binary("openssl");
    let python = require_binary("python3");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cdn.pem");
    let status = Command::new(openssl)
        .args(["genrsa", "-traditional", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let key_path = key.display().to_string();
    let app = spawn_app_with(&[
        ("MONETA_CDN_KEY_PAIR_ID", "K2JCJMDEHXQW5F"),
        ("MONETA_CDN_PRIVATE_KEY_FILE", &key_path),
        ("MONETA_CDN_BASE_URL", "https://d111111abcdef8.cloudfront.net"),
    ])
    .await;
    let now = chrono::Utc::now().timestamp();
    let body: Value = app
        .playback_info("m-0001", &app.token("u-basic", "basic", 1, "KR"))
        .await
        .json()
        .await
        .unwrap();
    let signed = body["streams"][0]["url"].as_str().unwrap().to_owned();
    let (resource, query) = signed.split_once('?').unwrap();
    assert_eq!(
        resource,
        "https://d111111abcdef8.cloudfront.net/m-0001/dash/manifest.mpd"
    );
    let expires: i64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("Expires="))
        .and_then(|v| v.parse().ok())
        .expect("Expires");
    assert!(expires >= now + 21_600, "valid at least MONETA_CDN_URL_TTL_S");
    assert!(expires <= now + 21_600 + 600);
    assert!(query.ends_with("&Key-Pair-Id=K2JCJMDEHXQW5F"));

    let out = Command::new(python)
        .args([
            "-c",
            BOTOCORE_SIGN,
            &key_path,
            "K2JCJMDEHXQW5F",
            resource,
            &expires.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), signed);
    // Subtitles are not signed.
    assert_eq!(
        body["subtitles"][0]["url"],
        "https://d111111abcdef8.cloudfront.net/m-0001/subs/ko.vtt"
    );
}
