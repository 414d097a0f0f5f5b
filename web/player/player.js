// Moneta's reference web client: what a player must do around the API.
//
// Query parameters (all optional):
//   token     a JWT; kept for this tab only, then removed from the address bar
//   content   title id (m-0001)
//   api       API origin, when it is not this page's (needs CORS on Moneta)
//   device    device id; otherwise a random one kept in localStorage
//   protocol  dash | hls, to force one stream
//   autoplay  0 to wait for the Play button even with a token
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const video = $('video');
  const params = new URLSearchParams(location.search);
  const apiBase = (params.get('api') || location.origin).replace(/\/+$/, '');

  // The page's observable state; the browser test reads it.
  const state = {
    phase: 'idle',
    deviceId: null,
    sessionId: null,
    heartbeatIntervalS: null,
    heartbeatsSent: 0,
    heartbeatsOk: 0,
    lastHeartbeat: null,
    resumePositionMs: null,
    startPositionS: null,
    playingFromS: null,
    protocol: null,
    keySystem: null,
    degraded: null,
    error: null,
    activeSessions: null,
    // Where ClearKey licences are asked for, and how many the player got.
    licenceUrl: null,
    licenceKeyId: null,
    licencesGranted: 0,
  };
  let licenceHeaders = {};
  // The licence request headers are read by the browser test to ask for a
  // licence as this page's session, the way a player's renewal would.
  window.monetaPlayer = { state, licenceHeaders: () => ({ ...licenceHeaders }) };

  let token = '';
  let player = null;
  let session = null; // { id, timer }
  let buffering = false;
  let markers = [];

  // ---------------------------------------------------------------------
  // Setup: token, device id

  function readToken() {
    const fromUrl = params.get('token');
    if (fromUrl) {
      sessionStorage.setItem('moneta.token', fromUrl);
      // A token in the address bar ends up in history and screenshots.
      params.delete('token');
      const rest = params.toString();
      history.replaceState(null, '', location.pathname + (rest ? `?${rest}` : '') + location.hash);
      return { token: fromUrl, fromUrl: true };
    }
    return { token: sessionStorage.getItem('moneta.token') || '', fromUrl: false };
  }

  function deviceId() {
    const forced = params.get('device');
    if (forced) return forced;
    let id = localStorage.getItem('moneta.deviceId');
    if (!id) {
      const bytes = crypto.getRandomValues(new Uint8Array(6));
      id = `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
      localStorage.setItem('moneta.deviceId', id);
    }
    return id;
  }

  // ---------------------------------------------------------------------
  // Display

  function show(field, text) {
    const el = document.querySelector(`[data-field="${field}"]`);
    if (el) el.textContent = text;
  }

  function setPhase(phase) {
    state.phase = phase;
    show('phase', phase);
    document.body.dataset.phase = phase;
    $('stop').disabled = !session;
    $('play').disabled = phase === 'starting';
  }

  function log(line, isError = false) {
    const li = document.createElement('li');
    li.textContent = `${new Date().toLocaleTimeString()}  ${line}`;
    if (isError) li.className = 'error';
    const list = $('log');
    list.prepend(li);
    while (list.children.length > 60) list.lastChild.remove();
  }

  function clearMessage() {
    $('message').hidden = true;
    $('message').className = '';
    $('devices').hidden = true;
    $('devices').replaceChildren();
  }

  function message(text, kind = 'error') {
    $('message-text').textContent = text;
    $('message').className = kind === 'info' ? 'info' : '';
    $('message').hidden = false;
  }

  const clock = (ms) => {
    const s = Math.max(0, Math.round(ms / 1000));
    const h = Math.floor(s / 3600);
    const mm = String(Math.floor((s % 3600) / 60)).padStart(h ? 2 : 1, '0');
    const ss = String(s % 60).padStart(2, '0');
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  };

  // What a viewer should read for each error code the API answers.
  const EXPLAIN = {
    missing_token: 'No token: paste one above.',
    invalid_token: 'The token was refused (expired, or signed with another key). Paste a fresh one.',
    subscription_inactive: 'This subscription is not active.',
    plan_not_eligible: 'Your plan does not include this title.',
    region_unavailable: 'This title is not available in your country.',
    no_entitlement: 'This account has no subscription.',
    content_not_found: 'There is no such title.',
    invalid_content_id: 'That is not a valid title id.',
    session_not_found: 'The playback session has ended (no heartbeat for too long). Press Play to start again.',
    session_evicted: 'Playback moved to another device.',
    dependency_unavailable: 'The service is temporarily unavailable.',
    rate_limited: 'Too many requests; slow down.',
  };

  function apiError(what, answer) {
    const err = answer.json?.error ?? {};
    const code = err.code ?? `http_${answer.status}`;
    state.error = { status: answer.status, code };
    let text = `${what}: ${answer.status} ${EXPLAIN[code] ?? ''} (${code}: ${err.message ?? 'no message'})`;
    if (answer.retryAfter) text += ` Retry in ${answer.retryAfter} s.`;
    if (answer.requestId) text += ` Request id ${answer.requestId}.`;
    return text;
  }

  function showPlayback(playback) {
    $('title').textContent = `${playback.title} (${playback.content_id}, ${clock(playback.duration_ms)})`;
    state.degraded = playback.degraded === true;
    $('degraded').hidden = !state.degraded;
    state.resumePositionMs = playback.resume_position_ms;
    show('resume', `${clock(playback.resume_position_ms)}${playback.watched ? ' (watched: starts over)' : ''}`);
    markers = playback.markers ?? [];
    show('markers', markers.length ? markers.map((m) => `${m.type} ${clock(m.start_ms)}–${clock(m.end_ms)}`).join(', ') : 'none');
  }

  // ---------------------------------------------------------------------
  // API

  async function call(method, path, body, { keepalive = false } = {}) {
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(apiBase + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        keepalive,
        cache: 'no-store',
      });
    } catch (e) {
      log(`${method} ${path} → network error: ${e.message}`, true);
      return { status: 0, json: { error: { code: 'network_error', message: String(e.message) } } };
    }
    let json = null;
    if (res.status !== 204) {
      try {
        json = await res.json();
      } catch {
        json = null;
      }
    }
    const answer = {
      status: res.status,
      json,
      requestId: res.headers.get('X-Request-Id'),
      retryAfter: res.headers.get('Retry-After'),
    };
    log(`${method} ${path} → ${res.status}${json?.error ? ` ${json.error.code}` : ''}`, res.status >= 400);
    return answer;
  }

  // ---------------------------------------------------------------------
  // Playback

  // The EME key system for each DRM system the API names. CENC content is
  // one encryption whatever the licence protocol, and the manifest names the
  // systems its packager served, so ClearKey is offered too: it is picked
  // only where a manifest names ClearKey (as the local stack's generated
  // media does).
  const KEY_SYSTEMS = {
    widevine: 'com.widevine.alpha',
    playready: 'com.microsoft.playready',
    fairplay: 'com.apple.fps',
  };

  // Moneta's licence proxy answers ClearKey at its own route, for a licence
  // token of any system (CONTRACT §8); any other licence server is asked at
  // the URL the API gave.
  const clearKeyUrl = (url) => url.replace(/\/v1\/licenses\/[a-z]+$/, '/v1/licenses/clearkey');

  function drmConfig(drm) {
    const servers = {};
    const advanced = {};
    if (drm) {
      const system = KEY_SYSTEMS[drm.system];
      if (system) servers[system] = drm.license_url;
      servers['org.w3.clearkey'] = clearKeyUrl(drm.license_url);
      if (drm.certificate_url && system) advanced[system] = { serverCertificateUri: drm.certificate_url };
    }
    return { servers, advanced };
  }

  // A refused licence request (the first one, or a renewal): the API's
  // error, when the licence server is Moneta's proxy.
  function licenceRefusal(error) {
    const http = error?.data?.[0];
    if (error?.code !== shaka.util.Error.Code.LICENSE_REQUEST_FAILED || http?.code !== shaka.util.Error.Code.BAD_HTTP_STATUS) return null;
    let json = null;
    try {
      json = JSON.parse(http.data[2]);
    } catch {
      json = null;
    }
    return { status: http.data[1], json, retryAfter: null, requestId: null };
  }

  // The proxy refuses a licence to a session that has ended: the picture
  // stops here whatever the heartbeats said.
  function onLicenceRefused(answer) {
    const code = answer.json?.error?.code;
    log(`licence → ${answer.status}${code ? ` ${code}` : ''}`, true);
    if (code !== 'session_evicted' && code !== 'session_not_found') return;
    endSession();
    video.pause();
    message(apiError('Licence', answer), code === 'session_evicted' ? 'info' : 'error');
    setPhase('stopped');
  }

  function candidates(streams) {
    const forced = params.get('protocol') || $('protocol').value;
    const order = forced ? [forced] : ['dash', 'hls'];
    return order.flatMap((p) => streams.filter((s) => s.protocol === p));
  }

  async function ensurePlayer() {
    if (player) return player;
    shaka.polyfill.installAll();
    if (!shaka.Player.isBrowserSupported()) throw new Error('this browser cannot play MSE streams');
    player = new shaka.Player();
    await player.attach(video);
    player.getNetworkingEngine().registerRequestFilter((type, request) => {
      if (type === shaka.net.NetworkingEngine.RequestType.LICENSE) {
        Object.assign(request.headers, licenceHeaders);
      }
    });
    player.getNetworkingEngine().registerResponseFilter((type) => {
      if (type === shaka.net.NetworkingEngine.RequestType.LICENSE) state.licencesGranted += 1;
    });
    player.addEventListener('buffering', (e) => {
      buffering = e.buffering;
      show('state', playerState());
    });
    player.addEventListener('error', (e) => {
      const refused = licenceRefusal(e.detail);
      if (refused) onLicenceRefused(refused);
      else log(`player error ${e.detail.code}`, true);
    });
    return player;
  }

  async function loadStream(playback) {
    const p = await ensurePlayer();
    const startS = (playback.resume_position_ms ?? 0) / 1000;
    const failures = [];
    for (const stream of candidates(playback.streams)) {
      for (const name of Object.keys(licenceHeaders)) delete licenceHeaders[name];
      Object.assign(licenceHeaders, stream.drm?.license_request_headers ?? {});
      const drm = drmConfig(stream.drm);
      state.licenceUrl = drm.servers['org.w3.clearkey'] ?? null;
      state.licenceKeyId = stream.drm?.key_id ?? null;
      p.configure({ drm });
      try {
        await p.load(stream.url, startS > 0 ? startS : null);
      } catch (e) {
        const why = e.code ? `shaka error ${e.code}` : e.message;
        failures.push(`${stream.protocol}: ${why}`);
        log(`cannot play ${stream.protocol}${stream.drm ? ` (${stream.drm.system})` : ''}: ${why}`, true);
        continue;
      }
      state.protocol = stream.protocol;
      state.keySystem = p.drmInfo()?.keySystem ?? null;
      state.startPositionS = startS;
      show('stream', `${stream.protocol.toUpperCase()} ${new URL(stream.url).pathname}`);
      show('drm', stream.drm
        ? `${stream.drm.system} key ${stream.drm.key_id} via ${state.keySystem ?? '?'}${stream.drm.license_token ? ', licence token sent' : ''}`
        : 'clear');
      await addSubtitles(p, playback.subtitles ?? []);
      return true;
    }
    message(`No stream of this title plays in this browser (${failures.join('; ') || 'none offered'}).`);
    return false;
  }

  async function addSubtitles(p, subtitles) {
    for (const sub of subtitles) {
      try {
        await p.addTextTrackAsync(sub.url, sub.language, 'subtitles', 'text/vtt');
      } catch (e) {
        log(`subtitle ${sub.language} not loaded: ${e.code ? `shaka error ${e.code}` : e.message}`, true);
      }
    }
    const want = navigator.language.slice(0, 2);
    const tracks = p.getTextTracks();
    const pick = tracks.find((t) => t.language === want) ?? tracks[0];
    // Selecting a track shows it; null would hide subtitles.
    if (pick) p.selectTextTrack(pick);
  }

  async function startPlaying() {
    try {
      await video.play();
    } catch (e) {
      if (e.name !== 'NotAllowedError') throw e;
      // Without a click, browsers allow only muted autoplay.
      video.muted = true;
      await video.play();
      message('Playing muted: unmute with the player controls.', 'info');
    }
  }

  function playerState() {
    if (buffering) return 'buffering';
    return video.paused || video.ended ? 'paused' : 'playing';
  }

  const positionMs = () => Math.max(0, Math.round(video.currentTime * 1000));

  // ---------------------------------------------------------------------
  // Session: start, heartbeats, stop

  async function start() {
    clearMessage();
    state.error = null;
    state.activeSessions = null;
    state.playingFromS = null;
    token = $('token').value.trim().replace(/^Bearer\s+/i, '');
    if (!token) {
      message(EXPLAIN.missing_token);
      return;
    }
    sessionStorage.setItem('moneta.token', token);
    const contentId = $('content').value.trim();
    state.deviceId = $('device').value.trim();
    localStorage.setItem('moneta.deviceId', state.deviceId);
    if (session) await stop({ reason: 'restart' });
    setPhase('starting');

    const info = await call('GET', `/v1/contents/${encodeURIComponent(contentId)}/playback-info`);
    if (info.status !== 200) {
      message(apiError('Playback info', info));
      setPhase('error');
      return;
    }
    showPlayback(info.json);

    const started = await call('POST', '/v1/playback/sessions', { content_id: contentId, device_id: state.deviceId });
    if (started.status === 409 && started.json?.error?.code === 'stream_limit_reached') {
      showStreamLimit(started.json.error);
      setPhase('blocked');
      return;
    }
    if (started.status !== 201) {
      message(apiError('Session start', started));
      setPhase('error');
      return;
    }
    const s = started.json;
    // The session's own answer: its licence tokens are bound to this session.
    showPlayback(s.playback);
    session = { id: s.session_id, timer: null, contentId };
    state.sessionId = s.session_id;
    state.heartbeatIntervalS = s.heartbeat_interval_s;
    show('session', `${s.session_id.split('.')[0].slice(0, 12)}… on ${state.deviceId}, heartbeat every ${s.heartbeat_interval_s} s`);
    if (s.evicted_session_id) message('Another device was stopped to make room for this one.', 'info');

    if (!(await loadStream(s.playback))) {
      await stop({ reason: 'unplayable' });
      setPhase('error');
      return;
    }
    session.timer = setInterval(heartbeat, s.heartbeat_interval_s * 1000);
    setPhase('playing');
    await startPlaying();
  }

  function showStreamLimit(error) {
    state.activeSessions = error.active_sessions ?? [];
    state.error = { status: 409, code: error.code };
    message(
      `Too many streams: this account may watch on ${error.max_streams} device${error.max_streams === 1 ? '' : 's'} at once. ` +
        'Stop playback on one of these to watch here:',
    );
    const list = $('devices');
    for (const other of state.activeSessions) {
      const li = document.createElement('li');
      const code = document.createElement('code');
      code.textContent = other.device_id;
      li.append(code, ` watching ${other.content_id}`);
      li.dataset.deviceId = other.device_id;
      list.append(li);
    }
    list.hidden = false;
  }

  // Set while the server has asked for no heartbeat before then (Retry-After).
  let heartbeatNotBefore = 0;

  // Retry-After in seconds (delta-seconds or an HTTP date), or null.
  function retryAfterS(answer) {
    if (!answer.retryAfter) return null;
    const seconds = Number(answer.retryAfter);
    if (Number.isFinite(seconds)) return Math.max(0, seconds);
    const at = Date.parse(answer.retryAfter);
    return Number.isNaN(at) ? null : Math.max(0, (at - Date.now()) / 1000);
  }

  async function heartbeat() {
    if (!session || Date.now() < heartbeatNotBefore) return;
    const id = session.id;
    const body = { position_ms: positionMs(), state: playerState() };
    state.heartbeatsSent += 1;
    const answer = await call('PUT', `/v1/playback/sessions/${encodeURIComponent(id)}`, body);
    if (!session || session.id !== id) return;
    if (answer.status === 200) {
      state.heartbeatsOk += 1;
      state.lastHeartbeat = body;
      show('heartbeats', `${state.heartbeatsOk} ok of ${state.heartbeatsSent}; last ${clock(body.position_ms)} ${body.state}`);
      return;
    }
    const code = answer.json?.error?.code;
    if (code === 'session_not_found' || code === 'session_evicted') {
      // The server has already ended this session; nothing left to stop.
      endSession();
      video.pause();
      message(apiError('Heartbeat', answer), code === 'session_evicted' ? 'info' : 'error');
      setPhase('stopped');
    } else if (answer.status === 503 && retryAfterS(answer) !== null) {
      // Shed (overloaded) or a dependency briefly unavailable: the picture
      // plays on, and the next heartbeat goes when the server asked, not
      // before; then the regular interval resumes. The session stays live
      // for three intervals, so one skipped heartbeat loses nothing: the
      // next one carries the position.
      const waitS = retryAfterS(answer);
      heartbeatNotBefore = Date.now() + waitS * 1000;
      show('heartbeats', `${state.heartbeatsOk} ok of ${state.heartbeatsSent}; last refused (${code ?? answer.status}), next in ${waitS} s`);
      // clearInterval also clears a timeout: both share one list of timers.
      clearInterval(session.timer);
      session.timer = setTimeout(() => {
        if (!session || session.id !== id) return;
        session.timer = setInterval(heartbeat, state.heartbeatIntervalS * 1000);
        heartbeat();
      }, waitS * 1000);
    } else {
      show('heartbeats', `${state.heartbeatsOk} ok of ${state.heartbeatsSent}; last failed (${answer.status})`);
    }
  }

  function endSession() {
    if (session?.timer) clearInterval(session.timer);
    session = null;
    state.sessionId = null;
  }

  async function stop({ reason, completed = false, keepalive = false } = {}) {
    if (!session) return;
    const id = session.id;
    const body = { position_ms: positionMs() };
    if (completed) body.completed = true;
    endSession();
    await call('DELETE', `/v1/playback/sessions/${encodeURIComponent(id)}`, body, { keepalive });
    if (reason !== 'unload') {
      show('session', `stopped at ${clock(body.position_ms)} (${reason})`);
      setPhase('stopped');
    }
  }

  // ---------------------------------------------------------------------
  // Wiring

  video.addEventListener('timeupdate', () => {
    show('position', clock(positionMs()));
    const inIntro = markers.find((m) => m.type === 'intro' && positionMs() >= m.start_ms && positionMs() < m.end_ms);
    $('skip').hidden = !inIntro;
    $('skip').dataset.to = inIntro ? String(inIntro.end_ms) : '';
  });
  video.addEventListener('playing', () => {
    if (session && state.playingFromS === null) state.playingFromS = video.currentTime;
  });
  for (const ev of ['play', 'pause', 'playing', 'waiting']) {
    video.addEventListener(ev, () => show('state', playerState()));
  }
  // A pause is where a viewer is most likely to leave: record it now.
  video.addEventListener('pause', () => {
    if (session && !video.ended) heartbeat();
  });
  video.addEventListener('ended', () => stop({ reason: 'ended', completed: true }));

  $('skip').addEventListener('click', () => {
    const to = Number($('skip').dataset.to) / 1000;
    if (to) video.currentTime = Math.min(to, video.duration - 0.5);
  });
  $('setup').addEventListener('submit', (e) => {
    e.preventDefault();
    start().catch((err) => {
      message(`Playback failed: ${err.message ?? err}`);
      setPhase('error');
    });
  });
  $('stop').addEventListener('click', async () => {
    // The stop carries the position; the session ends before the pause, so
    // the pause sends no heartbeat of its own.
    const stopped = stop({ reason: 'stopped' });
    video.pause();
    await stopped;
    if (player) await player.unload();
  });
  // Leaving or reloading the page: the last position goes with the stop, in
  // a request the browser finishes after the page is gone.
  window.addEventListener('pagehide', () => {
    if (session) stop({ reason: 'unload', keepalive: true });
  });

  const initial = readToken();
  $('token').value = initial.token;
  $('device').value = deviceId();
  if (params.get('content')) $('content').value = params.get('content');
  if (params.get('protocol')) $('protocol').value = params.get('protocol');
  show('api', apiBase);
  setPhase('idle');
  if (initial.token && params.get('autoplay') !== '0') $('play').click();
})();
