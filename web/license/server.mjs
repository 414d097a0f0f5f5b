// The local stack's licence server: a ClearKey licence proxy that checks
// Moneta's licence tokens (CONTRACT §7, "DRM: licence tokens") the way a
// production proxy does before it asks the DRM vendor for a licence.
//
//   POST /license/clearkey   Authorization: Bearer <license_token>
//     body (W3C ClearKey):   {"kids": ["<base64url key id>"], "type": "temporary"}
//     answer:                {"keys": [{"kty": "oct", "kid": "…", "k": "…"}], "type": "temporary"}
//   GET  /license/health     200
//
// Settings: MONETA_DRM_TOKEN_SECRET (required: the secret Moneta signs
// licence tokens with), LICENSE_LISTEN_ADDR (127.0.0.1:8090),
// LICENSE_KEYS_FILE (../media/clearkey.json). No dependencies beyond Node.

import { createHmac, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { fileURLToPath } from 'node:url';

const secret = process.env.MONETA_DRM_TOKEN_SECRET;
if (!secret) {
  console.error('license: MONETA_DRM_TOKEN_SECRET is not set');
  process.exit(2);
}
const [host, port] = (process.env.LICENSE_LISTEN_ADDR || '127.0.0.1:8090').split(/:(?=\d+$)/);
const keysFile = process.env.LICENSE_KEYS_FILE || fileURLToPath(new URL('../media/clearkey.json', import.meta.url));
const keys = new Map(JSON.parse(readFileSync(keysFile, 'utf8')).keys.map((k) => [k.key_id.toLowerCase(), k.key]));
const LEEWAY_S = 30;

const b64url = (buf) => buf.toString('base64url');
const hexOfB64url = (s) => Buffer.from(s, 'base64url').toString('hex');

function logLine(fields) {
  console.log(JSON.stringify({ time: new Date().toISOString(), target: 'license', ...fields }));
}

/** The claims of a valid HS256 licence token, or a reason it is not one. */
function verify(authorization) {
  const match = /^Bearer ([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)$/.exec(authorization ?? '');
  if (!match) return { reason: 'missing or malformed bearer token' };
  const [, header, payload, signature] = match;
  let head;
  let claims;
  try {
    head = JSON.parse(Buffer.from(header, 'base64url'));
    claims = JSON.parse(Buffer.from(payload, 'base64url'));
  } catch {
    return { reason: 'undecodable token' };
  }
  if (head.alg !== 'HS256') return { reason: `algorithm ${head.alg} not accepted` };
  const expected = createHmac('sha256', secret).update(`${header}.${payload}`).digest();
  const given = Buffer.from(signature, 'base64url');
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) return { reason: 'bad signature' };
  const now = Date.now() / 1000;
  if (typeof claims.exp !== 'number' || claims.exp + LEEWAY_S < now) return { reason: 'expired' };
  if (typeof claims.key_id !== 'string' || typeof claims.sub !== 'string') return { reason: 'claims missing' };
  return { claims };
}

function send(res, status, body, origin) {
  const headers = { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' };
  if (origin) {
    // Licences are gated by the token, not by the page's origin.
    headers['Access-Control-Allow-Origin'] = origin;
    headers.Vary = 'Origin';
  }
  res.writeHead(status, headers);
  res.end(body === null ? undefined : JSON.stringify(body));
}

const error = (code, message) => ({ error: { code, message } });

const server = createServer((req, res) => {
  const origin = req.headers.origin;
  const path = new URL(req.url, 'http://licence').pathname;
  if (req.method === 'OPTIONS') {
    res.writeHead(204, {
      'Access-Control-Allow-Origin': origin ?? '*',
      'Access-Control-Allow-Methods': 'POST',
      'Access-Control-Allow-Headers': 'authorization, content-type',
      'Access-Control-Max-Age': '600',
      Vary: 'Origin',
    });
    res.end();
    return;
  }
  if (path === '/license/health' && req.method === 'GET') {
    send(res, 200, { status: 'ok' }, origin);
    return;
  }
  if (path !== '/license/clearkey') {
    send(res, 404, error('not_found', 'No such route.'), origin);
    return;
  }
  if (req.method !== 'POST') {
    send(res, 405, error('method_not_allowed', 'POST a ClearKey licence request.'), origin);
    return;
  }
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size > 16 * 1024) req.destroy();
    else chunks.push(chunk);
  });
  req.on('end', () => {
    const { claims, reason } = verify(req.headers.authorization);
    if (!claims) {
      logLine({ msg: 'licence refused', reason });
      send(res, 401, error('invalid_license_token', `Licence token refused: ${reason}.`), origin);
      return;
    }
    let kids;
    try {
      kids = JSON.parse(Buffer.concat(chunks).toString('utf8')).kids;
      if (!Array.isArray(kids) || kids.length === 0) throw new Error('no kids');
    } catch {
      send(res, 400, error('bad_request', 'Expected a ClearKey licence request ({"kids": [...]}).'), origin);
      return;
    }
    const wanted = kids.map(hexOfB64url);
    // A token is for one title's key: any other key id is refused.
    const allowed = wanted.filter((kid) => kid === claims.key_id.toLowerCase() && keys.has(kid));
    if (allowed.length !== wanted.length) {
      logLine({ msg: 'licence refused', reason: 'key not covered by the token', sub: claims.sub, content_id: claims.content_id });
      send(res, 403, error('key_not_allowed', 'This licence token does not cover the requested key.'), origin);
      return;
    }
    logLine({
      msg: 'licence granted',
      sub: claims.sub,
      content_id: claims.content_id,
      session_id: claims.session_id ?? null,
      drm_system: claims.drm_system,
      key_ids: allowed,
    });
    send(
      res,
      200,
      {
        keys: allowed.map((kid) => ({ kty: 'oct', kid: b64url(Buffer.from(kid, 'hex')), k: b64url(Buffer.from(keys.get(kid), 'hex')) })),
        type: 'temporary',
      },
      origin,
    );
  });
});

server.listen(Number(port), host, () => logLine({ msg: `listening on ${host}:${port}` }));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
