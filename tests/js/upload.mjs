// One tus-js-client upload of a file, driven by tests/test_tusjs.py; prints one JSON line.
//
//   node upload.mjs --file PATH --endpoint URL --target /echo/x [--chunk-size N]
//                   [--data-during-creation] [--store urls.json] [--resume]
//                   [--abort-after N] [--timeout SECONDS] [--protocol tus-v1|ietf-draft-05]
//                   [--retry-delays MS,MS,...]
//
// --store keeps the fingerprint -> upload URL map in a JSON file (tus-js-client's
// FileUrlStorage), so a second run with --resume finds the upload with findPreviousUploads()
// and continues it with resumeFromPreviousUpload(). --abort-after calls upload.abort() from
// onProgress once that many bytes are reported. With --protocol ietf-draft-05 the endpoint is
// the proxied path itself (the IETF resumable-upload draft, interop version 6). Exit status: 0 success or deliberate abort,
// 1 upload error, 2 usage error or timeout.
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';

import { FileUrlStorage, Upload } from 'tus-js-client';

const { values: args } = parseArgs({
  options: {
    file: { type: 'string' },
    endpoint: { type: 'string' },
    target: { type: 'string' },
    'chunk-size': { type: 'string' },
    'data-during-creation': { type: 'boolean', default: false },
    store: { type: 'string' },
    resume: { type: 'boolean', default: false },
    'abort-after': { type: 'string' },
    timeout: { type: 'string', default: '60' },
    protocol: { type: 'string', default: 'tus-v1' },
    'retry-delays': { type: 'string', default: '0,1000,3000,5000' },
  },
});

function finish(code, outcome) {
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
  process.exit(code);
}

if (!args.file || !args.endpoint || !args.target) {
  finish(2, { ok: false, error: 'usage: --file PATH --endpoint URL --target PATH are required' });
}

const size = fs.statSync(args.file).size;
const abortAfter = args['abort-after'] === undefined ? null : Number(args['abort-after']);
const outcome = {
  ok: false,
  aborted: false,
  size,
  url: null,
  offset: null, // the last Upload-Offset the server answered
  previousUploads: null, // how many findPreviousUploads() returned (with --resume)
  resumedFrom: null, // Upload-Offset of the HEAD that a resumed upload starts with
  firstPatchOffset: null, // Upload-Offset of this run's first PATCH
  patchesSent: 0, // PATCH requests started (those cut before an answer included)
  requests: [], // [method, status, Upload-Offset answered] for every response seen
  lastResponse: null, // the last response: {method, status, headers}
  error: null,
};

setTimeout(() => {
  outcome.error = `timed out after ${args.timeout} s`;
  finish(2, outcome);
}, Number(args.timeout) * 1000).unref();

const upload = new Upload(fs.createReadStream(args.file), {
  endpoint: args.endpoint,
  protocol: args.protocol,
  chunkSize: args['chunk-size'] === undefined ? Number.POSITIVE_INFINITY : Number(args['chunk-size']),
  uploadDataDuringCreation: args['data-during-creation'],
  retryDelays: args['retry-delays'].split(',').map(Number),
  metadata: { target: args.target, filename: 'tusjs.bin', filetype: 'application/x-tusjs' },
  ...(args.store ? { urlStorage: new FileUrlStorage(args.store) } : {}),
  storeFingerprintForResuming: Boolean(args.store),
  removeFingerprintOnSuccess: false,
  onBeforeRequest(req) {
    if (req.getMethod() !== 'PATCH') return;
    outcome.patchesSent += 1;
    if (outcome.firstPatchOffset === null) {
      outcome.firstPatchOffset = Number(req.getHeader('Upload-Offset'));
    }
  },
  onAfterResponse(req, res) {
    const headers = res.getUnderlyingObject().headers;
    const offset = res.getHeader('Upload-Offset');
    outcome.requests.push([req.getMethod(), res.getStatus(), offset === undefined ? null : Number(offset)]);
    if (offset !== undefined) outcome.offset = Number(offset);
    if (req.getMethod() === 'HEAD' && outcome.resumedFrom === null && offset !== undefined) {
      outcome.resumedFrom = Number(offset);
    }
    outcome.lastResponse = { method: req.getMethod(), status: res.getStatus(), headers };
  },
  onProgress(bytesSent) {
    if (abortAfter !== null && !outcome.aborted && bytesSent >= abortAfter) {
      outcome.aborted = true;
      outcome.abortedAt = bytesSent;
      outcome.url = upload.url;
      // Let the upload's request settle (a response still on its way is not waited for).
      upload.abort().then(() => setTimeout(() => finish(0, outcome), 200));
    }
  },
  onSuccess() {
    outcome.ok = true;
    outcome.url = upload.url;
    finish(0, outcome);
  },
  onError(error) {
    outcome.url = upload.url;
    outcome.error = String(error);
    finish(1, outcome);
  },
});

if (args.resume) {
  const previous = await upload.findPreviousUploads();
  outcome.previousUploads = previous.length;
  if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0]);
}
upload.start();
