// One tus-js-client upload from a page on another origin than fileproxy's, then a cross-origin
// HEAD of the upload's URL; the outcome goes to POST /result (see tests/test_browser.py).
//
//   /?proxy=http://127.0.0.1:Q&size=BYTES&target=/echo/browser/x[&chunk=BYTES]
//
// The file is a Blob of `size` bytes, byte i being i % 251. Outcome: {ok, stage, error, url,
// requests: [[method, status, Upload-Offset]], head: {status, headers visible to the page}}.
'use strict';

(function () {
  const params = new URLSearchParams(window.location.search);
  const proxy = params.get('proxy');
  const size = Number(params.get('size'));
  const target = params.get('target');
  const chunkSize = Number(params.get('chunk') || 1024 * 1024);
  const requests = [];
  let reported = false;

  function show(text) {
    document.getElementById('status').textContent = text;
  }

  function report(outcome) {
    if (reported) return;
    reported = true;
    const body = JSON.stringify({
      ...outcome, requests, userAgent: navigator.userAgent, pageOrigin: window.location.origin,
    });
    show(body);
    fetch('/result', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body })
      .catch((error) => show(`could not report: ${error}\n${body}`));
  }

  function message(error) {
    return String((error && error.message) || error);
  }

  window.addEventListener('error', (event) => report({ ok: false, stage: 'page', error: event.message }));
  window.addEventListener('unhandledrejection',
    (event) => report({ ok: false, stage: 'page', error: message(event.reason) }));

  if (typeof tus === 'undefined' || !tus.isSupported) {
    report({ ok: false, stage: 'page', error: 'tus-js-client did not load or is not supported' });
    return;
  }

  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i += 1) bytes[i] = i % 251;
  const blob = new Blob([bytes], { type: 'application/octet-stream' });

  async function headUpload(url) {
    // Tus-Resumable is not a CORS-safelisted header: this HEAD is preflighted too.
    const response = await fetch(url, { method: 'HEAD', headers: { 'Tus-Resumable': '1.0.0' } });
    const headers = {};
    response.headers.forEach((value, name) => { headers[name] = value; });
    return { status: response.status, headers };
  }

  const upload = new tus.Upload(blob, {
    endpoint: `${proxy}/_fileproxy/uploads/`,
    chunkSize,
    metadata: { target, filetype: 'application/octet-stream' },
    retryDelays: [0, 1000],
    onAfterResponse(request, response) {
      requests.push([request.getMethod(), response.getStatus(), response.getHeader('Upload-Offset')]);
    },
    onProgress(sent, total) {
      show(`uploading: ${sent} of ${total}`);
    },
    onError(error) {
      report({ ok: false, stage: 'upload', error: message(error), url: upload.url });
    },
    onSuccess() {
      headUpload(upload.url).then(
        (head) => report({ ok: true, stage: 'done', url: upload.url, head }),
        (error) => report({ ok: false, stage: 'head', error: message(error), url: upload.url }));
    },
  });
  upload.start();
}());
