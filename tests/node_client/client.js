// A remotemedia.v1 client written the way the existing Node.js clients are:
// @grpc/grpc-js + proto-loader with keepCase, snake_case fields, params as a
// JSON string, an optional bearer key, extra call metadata, no client_version
// on GetVersion, and a stream that sends init, every chunk and CLOSE at once
// without waiting for `ready`. Prints one JSON object with what it saw.
'use strict';
const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [address, apiKey] = process.argv.slice(2);
const def = loader.loadSync(['execution.proto', 'streaming.proto'], {
  keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  includeDirs: [path.join(__dirname, '..', '..', 'proto')],
});
const v1 = grpc.loadPackageDefinition(def).remotemedia.v1;
const creds = grpc.credentials.createInsecure();
const exec = new v1.PipelineExecutionService(address, creds);
const streaming = new v1.StreamingPipelineService(address, creds);

function metadata() {
  const md = new grpc.Metadata();
  md.set('x-client', 'node-check');
  if (apiKey) md.set('authorization', `Bearer ${apiKey}`);
  return md;
}

const manifest = (nodes, connections) => ({
  version: 'v1',
  metadata: { name: 'node-client', description: 'from Node', created_at: new Date().toISOString() },
  nodes: nodes.map(([id, node_type, params]) => ({ id, node_type, params: JSON.stringify(params || {}), is_streaming: true })),
  connections: connections.map(([from, to]) => ({ from, to })),
});

function unary(method, request) {
  return new Promise((resolve, reject) =>
    exec[method](request, metadata(), (err, res) => (err ? reject(err) : resolve(res))));
}

function audio(n, seed) {
  const buf = Buffer.alloc(n * 4);
  for (let i = 0; i < n; i++) buf.writeFloatLE(Math.sin((i + seed) / 7), i * 4);
  return { samples: buf, sample_rate: 16000, channels: 1, format: 'AUDIO_FORMAT_F32', num_samples: n };
}

function stream(n, nodes) {
  return new Promise((resolve, reject) => {
    const seen = { kinds: [], results: [], error: null };
    const call = streaming.StreamPipeline(metadata());
    call.on('data', (resp) => {
      seen.kinds.push(resp.response);
      if (resp.response === 'result') {
        const out = resp.result.data_outputs.sum;
        seen.results.push({ sequence: resp.result.sequence, value: JSON.parse(out.json.json_payload) });
      } else if (resp.response === 'error') {
        seen.error = resp.error;
      }
    });
    call.on('error', reject);
    call.on('end', () => resolve(seen));
    // everything at once, as one existing client does
    call.write({ init: { manifest: manifest(nodes, [['echo', 'sum']]) } });
    for (let i = 0; i < n; i++) {
      if (i % 2) call.write({ data_chunk: { node_id: 'echo', buffer: { audio: audio(320, i) }, sequence: i } });
      else call.write({ audio_chunk: { node_id: 'echo', buffer: audio(320, i), sequence: i } });  // the deprecated form
    }
    call.write({ control: { command: 'COMMAND_CLOSE' } });
    call.end();
  });
}

(async () => {
  const out = {};
  try {
    const version = await unary('GetVersion', {});
    out.version = { compatible: version.compatible, protocol: version.version_info.protocol_version,
                    node_types: version.version_info.supported_node_types };
    const request = { manifest: manifest([['p', 'PassThroughNode']], []),
                      data_inputs: { p: { text: { text_data: Buffer.from('héllo from node'), encoding: 'utf-8' } } } };
    const res = await unary('ExecutePipeline', request);
    out.unary = { outcome: res.outcome, text: res.result && res.result.data_outputs.p.text.text_data.toString('utf-8'),
                  status: res.result && res.result.status };
    const bad = await unary('ExecutePipeline', { manifest: manifest([['x', 'NoSuchNode']], []) });
    out.unary_error = { outcome: bad.outcome, error_type: bad.error.error_type, node: bad.error.failing_node_id };
    out.stream = await stream(8, [['echo', 'EchoNode'], ['sum', 'ChecksumNode']]);
    // a pipeline that cannot start, with everything already sent: the error, then a clean end
    const failed = await stream(8, [['echo', 'EchoNode'], ['sum', 'NoSuchNode']]);
    out.stream_error = { kinds: failed.kinds, error_type: failed.error && failed.error.error_type,
                         node: failed.error && failed.error.failing_node_id };
  } catch (err) {
    out.failure = { code: err.code, details: err.details };
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  exec.close();
  streaming.close();
})();
