// The RemoteMedia Next.js app's server side, as its routes drive the original
// nodejs-client: the app's manifest (nodeType, params as a JSON string,
// isStreaming) mapped the way that client maps it (descriptions and `config`
// dropped), StreamPipeline only, and each result read the way it reads one:
// only the first entry of data_outputs, as audio or text.
//
//   node app_client.js ADDRESS tts FIXTURE OUT.f32
//   node app_client.js ADDRESS s2s FIXTURE OUTDIR Q1.f32 [Q2.f32 ...]   (24 kHz float32 utterances)
//   node app_client.js ADDRESS vad FIXTURE OUT.f32 Q.f32                (44.1 kHz float32, sent in 64 ms blocks)
//
// Prints one JSON object with what it saw.
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [address, flow, fixture, out, ...inputs] = process.argv.slice(2);
const def = loader.loadSync(['execution.proto', 'streaming.proto'], {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  includeDirs: [path.join(__dirname, '..', '..', 'proto')],
});
const v1 = grpc.loadPackageDefinition(def).remotemedia.v1;
const streaming = new v1.StreamingPipelineService(address, grpc.credentials.createInsecure());

function wire(manifest) {  // nodejs-client grpc-client.ts: init.manifest
  return {
    version: manifest.version,
    metadata: { name: manifest.metadata.name, description: manifest.metadata.description || '',
                created_at: manifest.metadata.createdAt || new Date().toISOString() },
    nodes: manifest.nodes.map((n) => ({ id: n.id, node_type: n.nodeType, params: n.params,
                                        is_streaming: n.isStreaming || false })),
    connections: (manifest.connections || []).map((c) => ({ from: c.from, to: c.to })),
  };
}

function chunkResult(response) {  // nodejs-client: the first data output only
  const outputs = response.result.data_outputs || {};
  const first = Object.values(outputs)[0];
  const r = { sequence: Number(response.result.sequence) };
  if (first && first.audio) {
    r.audio = Buffer.from(first.audio.samples);
    r.sampleRate = first.audio.sample_rate;
    r.channels = first.audio.channels;
    r.format = first.audio.format;
  } else if (first && first.text) {
    r.text = Buffer.from(first.text.text_data).toString('utf-8');
  }
  return r;
}

// A stream whose results are read one at a time, like PersistentStreamSession.getResults()
function open(manifest) {
  const call = streaming.StreamPipeline(new grpc.Metadata());
  const queue = [];
  const seen = { kinds: [], error: null, ended: false };
  let wake = null;
  const poke = () => { if (wake) { const w = wake; wake = null; w(); } };
  call.on('data', (resp) => {
    seen.kinds.push(resp.response);
    if (resp.response === 'result') queue.push(chunkResult(resp));
    else if (resp.response === 'error') seen.error = { type: resp.error.error_type, node: resp.error.failing_node_id,
                                                       message: resp.error.message };
    poke();
  });
  call.on('error', (err) => { seen.error = seen.error || { code: err.code, message: err.details }; seen.ended = true; poke(); });
  call.on('end', () => { seen.ended = true; poke(); });
  call.write({ init: { manifest: wire(manifest), client_version: 'v1' } });
  async function next() {
    while (!queue.length && !seen.ended) await new Promise((r) => { wake = r; });
    return queue.shift();
  }
  return { call, seen, next };
}

const f32 = (file) => fs.readFileSync(file);
const audioChunk = (node, samples, rate, channels, format, metadata, sequence) => ({
  data_chunk: { node_id: node, buffer: { audio: { samples, sample_rate: rate, channels, format,
                num_samples: samples.length / 4 }, metadata: metadata || {} }, sequence },
});
const close = (s) => { s.call.write({ control: { command: 1 } }); s.call.end(); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function tts(manifest) {  // app/api/tts/stream/route.ts
  const s = open(manifest);
  const text = JSON.parse(manifest.nodes[0].params).text;
  const t0 = Date.now();
  s.call.write({ data_chunk: { node_id: 'tts', buffer: { text: { text_data: Buffer.from(text, 'utf-8'),
                 encoding: 'utf-8', language: 'en' }, metadata: {} }, sequence: 0 } });
  close(s);  // COMMAND_CLOSE and half-close at once: every result must still come
  const audio = [];
  const texts = [];
  const rates = new Set();
  let firstAudioMs = null;
  for (let r = await s.next(); r; r = await s.next()) {
    if (r.audio) {
      if (firstAudioMs === null) firstAudioMs = Date.now() - t0;
      audio.push(r.audio);
      rates.add(r.sampleRate);
    } else if (r.text) texts.push(r.text);
  }
  fs.writeFileSync(out, Buffer.concat(audio));
  return { kinds: [...new Set(s.seen.kinds)], error: s.seen.error, audio_results: audio.length,
           audio_bytes: Buffer.concat(audio).length, sample_rates: [...rates], texts, first_audio_ms: firstAudioMs };
}

async function s2s(manifest) {  // app/api/s2s/stream/route.ts with lib/grpc-session-manager.ts
  const s = open(manifest);
  const sessionId = 's2s_test';
  const turns = [];
  for (const [i, file] of inputs.entries()) {
    const t0 = Date.now();
    s.call.write(audioChunk('lfm2_audio', f32(file), 24000, 1, 1, { sessionId, reset: 'false' }, i));
    const turn = { texts: [], audio_bytes: 0, sample_rate: null, first_audio_ms: null };
    // the route relays text and the turn's first audio result, then stops reading
    for (let r = await s.next(); r; r = await s.next()) {
      if (r.text) turn.texts.push(r.text);
      if (r.audio) {
        turn.first_audio_ms = Date.now() - t0;
        turn.audio_bytes = r.audio.length;
        turn.sample_rate = r.sampleRate;
        fs.writeFileSync(path.join(out, `turn${i}.f32`), r.audio);
        break;
      }
    }
    turns.push(turn);
  }
  close(s);
  while (await s.next());  // what is left of the last reply, then the end
  return { kinds: [...new Set(s.seen.kinds)], error: s.seen.error, turns };
}

async function vad(manifest) {  // app/api/s2s/vad-stream/route.ts (WebSocket variant: channels 0, format 0)
  const s = open(manifest);
  const question = f32(inputs[0]);
  const block = 2822 * 4;  // 64 ms at 44.1 kHz
  const texts = [];
  const audio = [];
  const reader = (async () => {
    for (let r = await s.next(); r; r = await s.next()) {
      if (r.text) texts.push(r.text);
      if (r.audio) audio.push(r.audio);
    }
  })();
  let seq = 0;
  for (let at = 0; at < question.length; at += block) {
    s.call.write(audioChunk('input_chunker', question.subarray(at, at + block), 44100, 0, 0, {}, seq++));
    await sleep(64);  // real time, as a microphone sends it
  }
  close(s);
  await reader;
  fs.writeFileSync(out, Buffer.concat(audio));
  return { kinds: [...new Set(s.seen.kinds)], error: s.seen.error, texts, audio_bytes: Buffer.concat(audio).length };
}

(async () => {
  const manifest = JSON.parse(fs.readFileSync(fixture, 'utf-8'));
  let result;
  try {
    result = await ({ tts, s2s, vad })[flow](manifest);
  } catch (err) {
    result = { failure: String(err && err.stack || err) };
  }
  process.stdout.write(JSON.stringify(result) + '\n');
  streaming.close();
})();
