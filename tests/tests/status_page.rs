//! The live status page in a real browser: a pair runs (`castor primary`
//! and `castor backup` as processes), headless Chromium loads each daemon's
//! page (`http://[metrics] listen/`), its script polls `/status` and draws
//! the state and the plots; the test checks the state text in the rendered
//! DOM and that the screenshot is a picture (many colours, the banner's
//! "protected" green), not a blank page.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it); fails loudly without it.

use castor::cluster::{Cluster, Spec};
use castor::observe::Observer;
use castor::status::fetch_http;
use castor_node::ProtectionState;
use castor_tests::require_kvm;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn castor_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_castor-under-test"))
}

fn chromium() -> PathBuf {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
        {
            let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !p.is_empty() {
                return PathBuf::from(p);
            }
        }
    }
    panic!(
        "\n\n*** NO BROWSER: the status page test needs headless Chromium. ***\n\
         Install Debian's package: apt-get install chromium (.ci/run does).\n"
    );
}

/// Runs headless Chromium with `extra` arguments on `url`; returns stdout.
fn browse(profile: &Path, extra: &[String], url: &str) -> String {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        // Let the page's script fetch /status and render before the dump.
        "--virtual-time-budget=4000",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url);
    let out = cmd.output().expect("running chromium");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id`, from a dumped DOM.
fn element_text(dom: &str, id: &str) -> Option<String> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[start..];
    let open = rest.find('>')? + 1;
    let close = rest[open..].find('<')?;
    Some(rest[open..open + close].to_string())
}

struct Picture {
    width: u32,
    height: u32,
    colours: usize,
    /// Pixels of the "protected" banner colour (#15803d).
    green: usize,
}

fn look_at(png_path: &Path) -> Picture {
    let decoder = png::Decoder::new(std::fs::File::open(png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bpp = info.color_type.samples();
    assert!(bpp >= 3, "unexpected PNG colour type {:?}", info.color_type);
    let mut colours = HashSet::new();
    let mut green = 0;
    for px in buf[..info.buffer_size()].chunks_exact(bpp) {
        let rgb = (px[0], px[1], px[2]);
        if rgb == (0x15, 0x80, 0x3d) {
            green += 1;
        }
        colours.insert(rgb);
    }
    Picture {
        width: info.width,
        height: info.height,
        colours: colours.len(),
        green,
    }
}

fn wait_protected(addr: SocketAddr) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(90) {
        if fetch_http(addr)
            .is_ok_and(|s| s.state == ProtectionState::Protected && s.series.len() >= 5)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr} not protected within 90 s: {:?}", fetch_http(addr));
}

#[test]
fn status_page_shows_a_protected_pair_in_a_browser() {
    require_kvm();
    let _ = chromium();
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let spec = Spec {
        memory: "64M".into(),
        dirty_rate: "10M".into(),
        timeout_ms: 1000,
        metrics: true,
        ..Spec::default()
    };
    let cluster = Cluster::prepare(&castor_exe(), None, spec, obs.addr()).unwrap();
    let mut backup = cluster.start_backup().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut primary = cluster.start_primary().unwrap();
    let pm = cluster.primary_metrics.unwrap();
    let bm = cluster.backup_metrics.unwrap();
    // Protected, with a few seconds of plot points.
    wait_protected(pm);
    wait_protected(bm);
    primary.check_alive().unwrap();
    backup.check_alive().unwrap();

    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status_page");
    std::fs::create_dir_all(&out_dir).unwrap();
    for (role, addr) in [("primary", pm), ("backup", bm)] {
        let url = format!("http://{addr}/");
        let profile = cluster.dir.join(format!("chromium-{role}"));
        let dom = browse(&profile, &["--dump-dom".to_string()], &url);
        let state = element_text(&dom, "state").unwrap_or_default();
        let who = element_text(&dom, "who").unwrap_or_default();
        println!("{role} page: state {state:?}, header {who:?}");
        assert_eq!(
            state, "PROTECTED",
            "the {role} page does not show PROTECTED:\n{dom}"
        );
        assert!(who.starts_with(role), "the {role} page names {who:?}");
        assert!(
            dom.contains("<polyline"),
            "no plot drawn on the {role} page"
        );

        let shot = out_dir.join(format!("{role}.png"));
        let _ = std::fs::remove_file(&shot);
        browse(
            &profile,
            &[format!("--screenshot={}", shot.display())],
            &url,
        );
        let pic = look_at(&shot);
        println!(
            "{role} screenshot {}: {}x{}, {} colours, {} banner-green pixels",
            shot.display(),
            pic.width,
            pic.height,
            pic.colours,
            pic.green
        );
        assert_eq!((pic.width, pic.height), (1280, 900));
        assert!(
            pic.colours >= 16,
            "the {role} screenshot looks blank ({} colours)",
            pic.colours
        );
        assert!(
            pic.green > 10_000,
            "the {role} screenshot has no green PROTECTED banner ({} pixels)",
            pic.green
        );
    }
    primary.kill();
    backup.kill();
}
