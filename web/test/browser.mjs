// The demo player in a real browser (Debian's Chromium, driven by
// Playwright) against the whole local stack. scripts/test-browser starts the
// stack and runs this with:
//   PAGE_ORIGIN   where the player is opened (a different origin from the
//                 API, so every API call is a real CORS request)
//   API_ORIGIN    the API (also the licence proxy) and the CDN
//   TOKEN         a demo-basic token (limit: 1 stream; the stack evicts the
//                 oldest session at the limit)
//   TOKEN_INACTIVE  a demo-inactive token (subscription not active)
//   REDIS_PORT, DATABASE_URL, ADMIN_PORT, HEARTBEAT_S
//   ARTIFACTS     directory for screenshots and the measurements (JSON)
//   CHROMIUM      browser binary (/usr/bin/chromium)

import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const PAGE_ORIGIN = env('PAGE_ORIGIN');
const API_ORIGIN = env('API_ORIGIN');
const TOKEN = env('TOKEN');
const ARTIFACTS = env('ARTIFACTS');
const HEARTBEAT_S = Number(env('HEARTBEAT_S'));
const USER = 'demo-basic';
const CONTENT = 'm-0001';

const started = Date.now();
const measured = {};
mkdirSync(ARTIFACTS, { recursive: true });

function step(text) {
  console.log(`[browser] ${((Date.now() - started) / 1000).toFixed(1)}s  ${text}`);
}

function check(condition, what, detail) {
  if (!condition) throw new Error(`${what}${detail === undefined ? '' : `: ${JSON.stringify(detail)}`}`);
}

async function until(what, seconds, probe) {
  const deadline = Date.now() + seconds * 1000;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${seconds}s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const redisPosition = () => {
  // The user's positions key lives in its bucket (`moneta:{b<n>}:u:<user>:positions`).
  const key = execFileSync('redis-cli', ['-p', env('REDIS_PORT'), '--scan', '--pattern', `moneta:{b*}:u:${USER}:positions`], { encoding: 'utf8' }).trim().split('\n')[0];
  if (!key) return null;
  const out = execFileSync('redis-cli', ['-p', env('REDIS_PORT'), 'HGET', key, CONTENT], { encoding: 'utf8' }).trim();
  return out === '' ? null : Number.parseInt(out, 10);
};

const postgresPosition = () => {
  const out = execFileSync(
    'psql',
    ['-XAtq', env('DATABASE_URL'), '-c', `SELECT position_ms FROM watch_progress WHERE user_id = '${USER}' AND content_id = '${CONTENT}'`],
    { encoding: 'utf8' },
  ).trim();
  return out === '' ? null : Number.parseInt(out, 10);
};

async function heartbeatsAtMoneta() {
  const text = await (await fetch(`http://127.0.0.1:${env('ADMIN_PORT')}/metrics`)).text();
  return text
    .split('\n')
    .filter((l) => l.startsWith('moneta_http_requests_total{') && l.includes('method="PUT"') && l.includes('status="200"'))
    .reduce((sum, l) => sum + Number(l.trim().split(/\s+/).pop()), 0);
}

/** `moneta_license_requests_total{drm_system, outcome}` as Moneta counts it. */
async function licencesAtMoneta(system, outcome) {
  const text = await (await fetch(`http://127.0.0.1:${env('ADMIN_PORT')}/metrics`)).text();
  const series = `moneta_license_requests_total{drm_system="${system}",outcome="${outcome}"}`;
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line ? Number(line.trim().split(/\s+/).pop()) : 0;
}

const playerState = (page) => page.evaluate(() => ({ ...window.monetaPlayer.state, currentTime: document.getElementById('video').currentTime }));

// ---------------------------------------------------------------------------
// CORS as CONTRACT §7 says, through nginx.

async function checkCors() {
  const preflight = await fetch(`${API_ORIGIN}/v1/playback/sessions`, {
    method: 'OPTIONS',
    headers: { Origin: PAGE_ORIGIN, 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization, content-type' },
  });
  const h = (name) => preflight.headers.get(name) ?? '';
  check(preflight.status === 204, 'a CORS preflight (OPTIONS /v1/playback/sessions) through nginx answers 204', preflight.status);
  check(h('access-control-allow-origin') === PAGE_ORIGIN, 'preflight allows the page origin', h('access-control-allow-origin'));
  check(/\bPOST\b/.test(h('access-control-allow-methods')), 'preflight lists POST', h('access-control-allow-methods'));
  for (const name of ['authorization', 'content-type']) {
    check(h('access-control-allow-headers').toLowerCase().includes(name), `preflight allows ${name}`, h('access-control-allow-headers'));
  }
  const answer = await fetch(`${API_ORIGIN}/v1/contents/${CONTENT}/playback-info`, { headers: { Origin: PAGE_ORIGIN, Authorization: `Bearer ${TOKEN}` } });
  check(answer.status === 200, 'playback-info through nginx', answer.status);
  check(answer.headers.get('access-control-allow-origin') === PAGE_ORIGIN, 'answer carries Access-Control-Allow-Origin');
  const exposed = (answer.headers.get('access-control-expose-headers') ?? '').toLowerCase();
  check(exposed.includes('x-request-id') && exposed.includes('retry-after'), 'answer exposes X-Request-Id and Retry-After', exposed);
  const foreign = await fetch(`${API_ORIGIN}/v1/playback/sessions`, {
    method: 'OPTIONS',
    headers: { Origin: 'http://elsewhere.invalid', 'Access-Control-Request-Method': 'POST' },
  });
  check(!foreign.headers.has('access-control-allow-origin'), 'another origin gets no Access-Control-Allow-Origin');
  measured.cors = { preflight_status: preflight.status, allow_methods: h('access-control-allow-methods'), expose_headers: exposed };
}

// ---------------------------------------------------------------------------

async function main() {
  step('CORS preflight and headers through nginx');
  await checkCors();

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // A fresh profile per launch comes from Playwright itself.
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--autoplay-policy=no-user-gesture-required',
    ],
    timeout: 30_000,
  });
  const pageErrors = [];
  const pages = [];
  const open = async (context, query) => {
    const page = await context.newPage();
    pages.push(page);
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    page.on('console', (m) => {
      if (m.type() === 'error') console.log(`[page console] ${m.text()}`);
    });
    await page.goto(`${PAGE_ORIGIN}/player/?${query}`, { timeout: 15_000 });
    return page;
  };
  const query = new URLSearchParams({ token: TOKEN, api: API_ORIGIN, content: CONTENT }).toString();

  try {
    // --- first device: plays the DRM stream from the start
    step('first device: playback-info, session, DASH with ClearKey');
    const first = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await open(first, query);
    await until('the player to play', 30, async () => {
      const s = await playerState(page);
      if (s.phase === 'error' || s.phase === 'blocked') throw new Error(`player stopped: ${JSON.stringify(s.error)} ${await page.textContent('#message')}`);
      return s.phase === 'playing' && s.currentTime > 0;
    });
    let s = await playerState(page);
    check(s.protocol === 'dash', 'the DASH stream plays', s.protocol);
    check(s.keySystem === 'org.w3.clearkey', 'decrypted through EME with ClearKey', s.keySystem);
    check(s.licenceUrl === `${API_ORIGIN}/v1/licenses/clearkey`, "the licence came from Moneta's proxy", s.licenceUrl);
    check(s.licencesGranted >= 1, 'the player got its licence', s.licencesGranted);
    check((await licencesAtMoneta('clearkey', 'issued')) >= 1, 'Moneta issued the ClearKey licence for the session token');
    const t0 = s.currentTime;
    const playedAt = Date.now();
    await until('3 s of playback', 20, async () => (await playerState(page)).currentTime - t0 >= 3);
    s = await playerState(page);
    measured.seconds_played = Number((s.currentTime - t0).toFixed(2));
    measured.wall_seconds_for_that = Number(((Date.now() - playedAt) / 1000).toFixed(2));
    measured.key_system = s.keySystem;
    measured.licence_url = s.licenceUrl;
    measured.licences_issued_by_moneta = await licencesAtMoneta('clearkey', 'issued');

    // --- heartbeats reach Moneta, Redis, then PostgreSQL
    step('heartbeats: page → Moneta → Redis → PostgreSQL');
    await until('two heartbeats answered 200', HEARTBEAT_S * 3 + 5, async () => (await playerState(page)).heartbeatsOk >= 2);
    const inRedis = await until('the position in Redis', 10, async () => {
      const p = redisPosition();
      return p !== null && p > 0 ? p : null;
    });
    const inPostgres = await until('the position in PostgreSQL', 15, async () => {
      const p = postgresPosition();
      return p !== null && p > 0 ? p : null;
    });
    s = await playerState(page);
    check(Math.abs(inRedis - s.lastHeartbeat.position_ms) <= HEARTBEAT_S * 1000, 'Redis holds a recent heartbeat position', { inRedis, last: s.lastHeartbeat });
    measured.heartbeats_page_ok = s.heartbeatsOk;
    measured.heartbeats_at_moneta = await heartbeatsAtMoneta();
    measured.position_redis_ms = inRedis;
    measured.position_postgres_ms = inPostgres;
    check(measured.heartbeats_at_moneta >= 2, 'Moneta counted the heartbeats', measured.heartbeats_at_moneta);

    await page.screenshot({ path: join(ARTIFACTS, 'player-playing.png'), fullPage: true });
    measured.screenshot = join(ARTIFACTS, 'player-playing.png');

    // --- reload: the stop on unload saves the position, the page resumes there
    step('reload resumes at the saved position');
    const beforeReload = (await playerState(page)).currentTime;
    await page.reload({ timeout: 15_000 });
    await until('the reloaded player to play', 30, async () => {
      const r = await playerState(page);
      return r.phase === 'playing' && r.playingFromS !== null;
    });
    s = await playerState(page);
    const savedS = s.resumePositionMs / 1000;
    measured.position_before_reload_s = Number(beforeReload.toFixed(2));
    measured.saved_position_s = savedS;
    measured.resumed_at_s = Number(s.playingFromS.toFixed(2));
    measured.resume_error_s = Number(Math.abs(s.playingFromS - savedS).toFixed(2));
    measured.saved_behind_reload_s = Number((beforeReload - savedS).toFixed(2));
    check(savedS > 0, 'a resume position was offered', savedS);
    check(measured.resume_error_s <= 2, 'playback resumed within 2 s of the saved position', measured);
    check(Math.abs(measured.saved_behind_reload_s) <= HEARTBEAT_S + 1, 'the saved position is the one left at', measured);
    const firstDevice = s.deviceId;

    // --- a second device at limit 1 evicts the first (evict_oldest); the
    // first page says so, and its session gets no licence any more
    step('second device at limit 1: the first is evicted and refused its licence');
    const second = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const other = await open(second, query);
    await until('the second device to play', 30, async () => {
      const r = await playerState(other);
      if (r.phase === 'error' || r.phase === 'blocked') throw new Error(`second device stopped: ${JSON.stringify(r.error)} ${await other.textContent('#message')}`);
      return r.phase === 'playing' && r.currentTime > 0;
    });
    const o = await playerState(other);
    check(o.deviceId !== firstDevice, 'the second context is another device');
    check(o.keySystem === 'org.w3.clearkey' && o.licencesGranted >= 1, "the second device got its own licence from Moneta's proxy", o);
    await until('the first page to learn it was evicted', HEARTBEAT_S * 3 + 5, async () => (await playerState(page)).phase === 'stopped');
    s = await playerState(page);
    check(s.error?.status === 409 && s.error.code === 'session_evicted', 'the first device heard 409 session_evicted', s.error);
    const shown = await page.textContent('#message-text');
    check(/playback moved to another device/i.test(shown) && (await page.isVisible('#message')), 'the page shows "playback moved to another device"', shown);
    await page.screenshot({ path: join(ARTIFACTS, 'player-evicted.png'), fullPage: true });

    // What a player that ignored the 409 would do at its next licence
    // renewal: ask again with its session's licence token. Sent from the
    // evicted page, cross-origin, exactly as its CDM's request went.
    const renewal = await page.evaluate(async () => {
      const { state } = window.monetaPlayer;
      const kid = (hex) => btoa(String.fromCharCode(...hex.match(/../g).map((h) => parseInt(h, 16)))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
      const res = await fetch(state.licenceUrl, {
        method: 'POST',
        headers: window.monetaPlayer.licenceHeaders(),
        body: JSON.stringify({ kids: [kid(state.licenceKeyId)], type: 'temporary' }),
      });
      return { status: res.status, body: await res.json() };
    });
    check(renewal.status === 409 && renewal.body?.error?.code === 'session_evicted', 'a licence request from the evicted session is refused with 409 session_evicted', renewal);
    check((await licencesAtMoneta('clearkey', 'evicted')) >= 1, 'Moneta counted the refused licence');
    measured.evicted_licence_request = { status: renewal.status, code: renewal.body?.error?.code };
    measured.evicted_page_message = shown.trim();

    // --- the second device stops, then plays the clear HLS stream
    step('second device: stop, then the clear HLS stream');
    await other.click('#stop');
    await until('the second session to stop', 10, async () => (await playerState(other)).phase === 'stopped');
    await other.goto(`${PAGE_ORIGIN}/player/?${query}&protocol=hls`, { timeout: 15_000 });
    await until('HLS playback on the second device', 30, async () => {
      const r = await playerState(other);
      return r.phase === 'playing' && r.protocol === 'hls' && r.currentTime > 0.5;
    });
    measured.hls_plays = true;
    await other.click('#stop');

    // --- what the API refuses, the page says
    step('403 and 404 shown as the API answers them');
    const refused = async (q, status, code) => {
      await other.goto(`${PAGE_ORIGIN}/player/?${q}`, { timeout: 15_000 });
      await until(`the ${code} message`, 15, async () => (await playerState(other)).phase === 'error');
      const r = await playerState(other);
      check(r.error?.status === status && r.error.code === code, `${status} ${code}`, r.error);
      const text = await other.textContent('#message-text');
      check(text.includes(code) && (await other.isVisible('#message')), `the ${code} message is shown`, text);
    };
    await refused(new URLSearchParams({ token: TOKEN, api: API_ORIGIN, content: 'm-9999' }).toString(), 404, 'content_not_found');
    await refused(new URLSearchParams({ token: env('TOKEN_INACTIVE'), api: API_ORIGIN, content: CONTENT }).toString(), 403, 'subscription_inactive');
    measured.refusals_shown = ['404 content_not_found', '403 subscription_inactive'];

    check(pageErrors.length === 0, 'no uncaught errors in the page', pageErrors);
  } catch (e) {
    for (const [i, p] of pages.entries()) {
      await p.screenshot({ path: join(ARTIFACTS, `failure-page${i + 1}.png`), fullPage: true }).catch(() => {});
    }
    throw e;
  } finally {
    await browser.close();
  }
  measured.wall_seconds = Number(((Date.now() - started) / 1000).toFixed(1));
  writeFileSync(join(ARTIFACTS, 'browser-test.json'), `${JSON.stringify(measured, null, 2)}\n`);
  step(`passed: ${JSON.stringify(measured)}`);
}

main().catch((e) => {
  measured.failure = String(e.stack ?? e);
  writeFileSync(join(ARTIFACTS, 'browser-test.json'), `${JSON.stringify(measured, null, 2)}\n`);
  console.error(`[browser] FAILED: ${e.stack ?? e}`);
  process.exit(1);
});
