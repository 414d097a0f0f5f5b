// Encrypts the video track of a fragmented-MP4 DASH rendition with Common
// Encryption ('cenc', AES-128-CTR, ISO/IEC 23001-7), in place.
//
//   node cenc-encrypt.mjs DIR INIT_SEGMENT KEY_ID_HEX KEY_HEX
//
// ffmpeg's MP4 muxer can encrypt, but in fragmented output it writes no
// per-fragment sample encryption boxes, so no CDM can decrypt what it makes;
// this does the packaging step a real pipeline leaves to its packager.
// Every media segment in DIR whose name shares the init segment's stream
// number is encrypted; the init segment gains the protection scheme and a
// ClearKey `pssh`. Audio stays clear, which CENC allows per track.

import { createCipheriv, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

// W3C "common" system id: what ClearKey CDMs read from a `pssh`.
const CLEARKEY_SYSTEM_ID = Buffer.from('1077efecc0b24d02ace33c1e52e2fb4b', 'hex');
// A VP9 frame's uncompressed header has to stay readable before decryption
// (VP codec ISO-BMFF binding); this many leading bytes always cover it.
const CLEAR_LEAD = 80;
const IV_SIZE = 8;

const CONTAINERS = new Set(['moov', 'trak', 'mdia', 'minf', 'stbl', 'mvex', 'moof', 'traf', 'edts', 'dinf', 'sinf', 'schi']);
// Bytes between a sample entry's header and its child boxes.
const SAMPLE_ENTRY_FIELDS = { vide: 78, soun: 28 };

function parse(buf, start = 0, end = buf.length) {
  const boxes = [];
  let off = start;
  while (off + 8 <= end) {
    let size = buf.readUInt32BE(off);
    const type = buf.toString('latin1', off + 4, off + 8);
    let header = 8;
    if (size === 1) {
      size = Number(buf.readBigUInt64BE(off + 8));
      header = 16;
    } else if (size === 0) {
      size = end - off;
    }
    if (size < header || off + size > end) throw new Error(`malformed box ${type} at ${off}`);
    const box = { type, payload: buf.subarray(off + header, off + size) };
    if (CONTAINERS.has(type)) box.children = parse(buf, off + header, off + size);
    boxes.push(box);
    off += size;
  }
  if (off !== end) throw new Error(`trailing bytes at ${off}`);
  return boxes;
}

function serialize(boxes) {
  return Buffer.concat(boxes.map(serializeBox));
}

function serializeBox(box) {
  const body = box.children ? Buffer.concat([box.prefix ?? Buffer.alloc(0), serialize(box.children)]) : box.payload;
  const header = Buffer.alloc(8);
  header.writeUInt32BE(8 + body.length);
  header.write(box.type, 4, 'latin1');
  return Buffer.concat([header, body]);
}

const box = (type, payload) => ({ type, payload });
const fullBox = (type, version, flags, body) => {
  const vf = Buffer.alloc(4);
  vf.writeUInt32BE(((version & 0xff) << 24) | (flags & 0xffffff));
  return box(type, Buffer.concat([vf, body]));
};
const find = (boxes, type) => boxes.find((b) => b.type === type);
const u32 = (n) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};

function protectInit(buf, kid) {
  const top = parse(buf);
  const moov = find(top, 'moov');
  let protectedTrack = null;
  for (const trak of moov.children.filter((b) => b.type === 'trak')) {
    const mdia = find(trak.children, 'mdia');
    const handler = find(mdia.children, 'hdlr').payload.toString('latin1', 8, 12);
    if (handler !== 'vide') continue;
    const stbl = find(find(mdia.children, 'minf').children, 'stbl');
    const stsd = find(stbl.children, 'stsd');
    // stsd: full box header, entry count, then the sample entries.
    const entries = parse(stsd.payload, 8);
    const entry = entries[0];
    const fieldsLen = SAMPLE_ENTRY_FIELDS[handler];
    const original = entry.type;
    const sinf = {
      type: 'sinf',
      children: [
        box('frma', Buffer.from(original, 'latin1')),
        fullBox('schm', 0, 0, Buffer.concat([Buffer.from('cenc', 'latin1'), u32(0x00010000)])),
        {
          type: 'schi',
          children: [fullBox('tenc', 0, 0, Buffer.concat([Buffer.from([0, 0, 1, IV_SIZE]), kid]))],
        },
      ],
    };
    const encv = {
      type: 'encv',
      prefix: entry.payload.subarray(0, fieldsLen),
      children: [...parse(entry.payload, fieldsLen), sinf],
    };
    stsd.payload = Buffer.concat([stsd.payload.subarray(0, 8), serializeBox(encv), serialize(entries.slice(1))]);
    const tkhd = find(trak.children, 'tkhd').payload;
    protectedTrack = tkhd[0] === 1 ? tkhd.readUInt32BE(20) : tkhd.readUInt32BE(12);
  }
  if (protectedTrack === null) throw new Error('no video track in the init segment');
  const pssh = fullBox(
    'pssh',
    1,
    0,
    Buffer.concat([CLEARKEY_SYSTEM_ID, u32(1), kid, u32(0)]),
  );
  moov.children.push(pssh);
  return serialize(top);
}

function readTfhd(payload) {
  const flags = payload.readUInt32BE(0) & 0xffffff;
  let off = 8;
  const tfhd = { flags };
  if (flags & 0x1) off += 8; // base_data_offset
  if (flags & 0x2) off += 4; // sample_description_index
  if (flags & 0x8) off += 4; // default_sample_duration
  if (flags & 0x10) tfhd.defaultSize = payload.readUInt32BE(off);
  if (flags & 0x1) throw new Error('explicit base_data_offset is not supported');
  return tfhd;
}

function readTrun(payload, defaultSize) {
  const flags = payload.readUInt32BE(0) & 0xffffff;
  const count = payload.readUInt32BE(4);
  let off = 8;
  let dataOffsetAt = null;
  if (flags & 0x1) {
    dataOffsetAt = off;
    off += 4;
  }
  if (flags & 0x4) off += 4;
  const sizes = [];
  for (let i = 0; i < count; i++) {
    if (flags & 0x100) off += 4;
    if (flags & 0x200) {
      sizes.push(payload.readUInt32BE(off));
      off += 4;
    } else {
      sizes.push(defaultSize);
    }
    if (flags & 0x400) off += 4;
    if (flags & 0x800) off += 4;
  }
  if (dataOffsetAt === null) throw new Error('trun without data_offset is not supported');
  if (sizes.some((s) => s === undefined)) throw new Error('sample sizes unknown');
  return { sizes, dataOffsetAt, dataOffset: payload.readInt32BE(dataOffsetAt) };
}

function encryptSegment(buf, key) {
  const top = parse(buf);
  // Byte offset of each top-level box, for locating samples in the mdat.
  const offsets = [];
  let at = 0;
  for (const b of top) {
    offsets.push(at);
    at += 8 + (b.children ? serialize(b.children).length : b.payload.length);
  }
  const growth = [];
  for (let i = 0; i < top.length; i++) {
    const moof = top[i];
    if (moof.type !== 'moof') continue;
    const mdatIndex = i + 1;
    if (top[mdatIndex]?.type !== 'mdat') throw new Error('moof not followed by mdat');
    const mdat = top[mdatIndex];
    const trafs = moof.children.filter((b) => b.type === 'traf');
    if (trafs.length !== 1) throw new Error('one track per fragment expected');
    const traf = trafs[0];
    const tfhd = readTfhd(find(traf.children, 'tfhd').payload);
    const trunBox = find(traf.children, 'trun');
    const trun = readTrun(trunBox.payload, tfhd.defaultSize);
    // The data offset counts from the moof's first byte; make it mdat-relative.
    const mdatData = Buffer.from(mdat.payload);
    let sampleAt = trun.dataOffset - (offsets[mdatIndex] - offsets[i]) - 8;
    const senc = [u32(trun.sizes.length)];
    const auxSizes = [];
    for (const size of trun.sizes) {
      const iv = randomBytes(IV_SIZE);
      const protectedBytes = size > CLEAR_LEAD + 16 ? Math.floor((size - CLEAR_LEAD) / 16) * 16 : 0;
      const clearBytes = size - protectedBytes;
      if (protectedBytes > 0) {
        const cipher = createCipheriv('aes-128-ctr', key, Buffer.concat([iv, Buffer.alloc(8)]));
        const region = mdatData.subarray(sampleAt + clearBytes, sampleAt + size);
        cipher.update(region).copy(region);
      }
      const sub = Buffer.alloc(2 + 6);
      sub.writeUInt16BE(1, 0);
      sub.writeUInt16BE(clearBytes, 2);
      sub.writeUInt32BE(protectedBytes, 4);
      senc.push(iv, sub);
      auxSizes.push(IV_SIZE + sub.length);
      sampleAt += size;
    }
    mdat.payload = mdatData;
    const sencBox = fullBox('senc', 0, 0x2, Buffer.concat(senc));
    const saiz = fullBox('saiz', 0, 0, Buffer.concat([Buffer.from([0]), u32(auxSizes.length), Buffer.from(auxSizes)]));
    const saio = fullBox('saio', 0, 0, Buffer.concat([u32(1), u32(0)]));
    const before = serializeBox(moof).length;
    traf.children.push(sencBox, saiz, saio);
    const after = serializeBox(moof).length;
    const delta = after - before;
    trunBox.payload = Buffer.from(trunBox.payload);
    trunBox.payload.writeInt32BE(trun.dataOffset + delta, trun.dataOffsetAt);
    // saio points at the first IV: the senc's payload past its full-box
    // header and sample count, counted from the moof's first byte.
    let sencAt = 8;
    for (const child of moof.children) {
      if (child === traf) break;
      sencAt += serializeBox(child).length;
    }
    sencAt += 8;
    for (const child of traf.children) {
      if (child === sencBox) break;
      sencAt += serializeBox(child).length;
    }
    saio.payload.writeUInt32BE(sencAt + 8 + 8, 8);
    growth.push(delta);
  }
  const sidx = find(top, 'sidx');
  if (sidx) {
    // Each reference covers one moof+mdat pair, whose size just changed.
    const p = Buffer.from(sidx.payload);
    const version = p[0];
    let off = 4 + 4 + 4 + (version === 0 ? 8 : 16) + 2;
    const refs = p.readUInt16BE(off);
    off += 2;
    if (refs !== growth.length) throw new Error('sidx references do not match the fragments');
    for (let r = 0; r < refs; r++, off += 12) {
      const word = p.readUInt32BE(off);
      p.writeUInt32BE((word & 0x80000000) | ((word & 0x7fffffff) + growth[r]), off);
    }
    sidx.payload = p;
  }
  return serialize(top);
}

const [dir, init, kidHex, keyHex] = process.argv.slice(2);
if (!dir || !init || !/^[0-9a-f]{32}$/.test(kidHex ?? '') || !/^[0-9a-f]{32}$/.test(keyHex ?? '')) {
  console.error('usage: cenc-encrypt.mjs DIR INIT_SEGMENT KEY_ID_HEX KEY_HEX');
  process.exit(2);
}
const kid = Buffer.from(kidHex, 'hex');
const key = Buffer.from(keyHex, 'hex');
const stream = init.match(/(\d+)\.m4s$/)?.[1];
if (stream === undefined) throw new Error(`cannot tell the stream number of ${init}`);
writeFileSync(join(dir, init), protectInit(readFileSync(join(dir, init)), kid));
let count = 0;
for (const name of readdirSync(dir)) {
  if (!new RegExp(`^chunk-stream${stream}-\\d+\\.m4s$`).test(name)) continue;
  const path = join(dir, name);
  writeFileSync(path, encryptSegment(readFileSync(path), key));
  count += 1;
}
console.log(`cenc: encrypted ${count} segments of stream ${stream} (key id ${kidHex})`);
