// The stream-runtime browser player: reads the websocket (protocol stream-runtime/1, docs/protocol.md) directly
// and draws frames on a canvas, paced at the stream's fps by a jitter buffer keyed on the frame number. The
// Gradio controls call window.streamPlayer.start/update/stop through `js=` event hooks; nothing goes through
// Gradio's queue. Counters for tests and the stats line: framesDrawn, framesReceived, chunks, ... (see stats()).
(() => {
  "use strict";
  if (window.streamPlayer) return; // the head script may be inserted twice (e.g. on a Gradio re-render)

  const MAGIC = 0x5352544d; // "SRTM", read big-endian so the bytes spell it
  const HEADER_SIZE = 28;
  const KIND_OUTPUT = 1;
  const KIND_INPUT = 2;
  const FORMAT = { raw: 0, jpeg: 1, rgba: 2 };
  const PROTOCOL = "stream-runtime/1";
  const INPUT_JPEG_QUALITY = 0.8;
  const MAX_INPUT_BUFFERED_BYTES = 1 << 20; // skip a webcam frame rather than queue behind a slow socket
  // Flow control for a model faster than real time: the server sends every chunk as soon as it is generated, so
  // the queue of frames waiting for their slot would grow without bound (and with it the delay of a prompt
  // switch). Above FLOW_PAUSE_CHUNKS chunk intervals of queued frames the player sends `pause`, below
  // FLOW_RESUME_CHUNKS `resume`: one chunk interval of jitter buffer plus one chunk in flight stays queued.
  const FLOW_PAUSE_CHUNKS = 3;
  const FLOW_RESUME_CHUNKS = 2;
  const STATS_INTERVAL_MS = 250;
  const FPS_WINDOW_MS = 1000;

  const byId = (id) => document.getElementById(id);

  class StreamPlayer {
    constructor() {
      this.ws = null;
      this.state = "idle"; // idle | connecting | opening | live | closing | closed | error
      this.errors = []; // every `error` event and client-side failure, newest last
      this.camera = null;
      this.inputTimer = null;
      this._resetSession();
      this._lastStats = 0;
      requestAnimationFrame((t) => this._tick(t));
    }

    _resetSession() {
      this.session = null;
      this.opened = null;
      this.fps = 16;
      this.frameMs = 1000 / 16;
      this.jitterMs = 0;
      this.chunkMs = 0; // one chunk interval: frames_per_chunk / fps
      this.flowPaused = false;
      this.flowPauses = 0;
      this.userPaused = false;
      this.t0 = null; // performance.now() at which frame 0 is due; frame n is due at t0 + n * frameMs
      this.queue = []; // {frame, due, bitmap, failed}, sorted by frame
      this.framesReceived = 0;
      this.framesDrawn = 0;
      this.lastFrameDrawn = -1;
      this.chunks = 0;
      this.rebuffers = 0; // frames that arrived after they were due: the clock was re-anchored
      this.lateDrops = 0; // decoded frames skipped because a newer one was already due
      this.gapFrames = 0; // frame numbers never drawn (server drops + late drops)
      this.serverDroppedChunks = 0;
      this.serverDroppedFrames = 0;
      this.lastChunk = null;
      this.openSentAt = null;
      this.ttffMs = null; // open sent -> first frame drawn (includes the jitter buffer)
      this.firstFrameMs = null; // open sent -> first frame received
      this.drawTimes = [];
      this.updatesAcked = 0;
      this.inputSent = 0;
      this.inputSkipped = 0;
      this.recordingUrl = null;
      this.recordingFrames = 0;
      this.closedInfo = null;
    }

    // -- public API (called by the Gradio controls)

    /** Open a session: {prompt, mode, steps, seed, blend_chunks, record}. A running session is ended first. */
    async start(opts) {
      opts = opts || {};
      if (!opts.prompt || !String(opts.prompt).trim()) {
        this._fail("enter a prompt first");
        return;
      }
      this._teardown();
      this._resetSession();
      this._setDownload(null);
      this.state = "connecting";
      this._status("connecting…");
      const mode = opts.mode === "v2v" ? "v2v" : "t2v";
      if (mode === "v2v") {
        try {
          await this._startCamera();
        } catch (err) {
          this._fail(`webcam: ${err && err.message ? err.message : err}`);
          this.state = "error";
          return;
        }
      }
      const ws = new WebSocket(this._wsUrl());
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      const open = { type: "open", protocol: PROTOCOL, prompt: String(opts.prompt), mode, format: "jpeg" };
      for (const key of ["steps", "seed", "blend_chunks"]) {
        const value = Number(opts[key]);
        if (opts[key] !== undefined && opts[key] !== null && opts[key] !== "" && Number.isFinite(value)) {
          open[key] = Math.round(value);
        }
      }
      if (opts.record) open.record = true;
      ws.onmessage = (ev) => {
        if (ws !== this.ws) return; // a socket we already left
        if (typeof ev.data === "string") this._onEvent(JSON.parse(ev.data), open);
        else this._onFrame(ev.data);
      };
      ws.onerror = () => {
        if (ws === this.ws) this._fail(`websocket error (${this._wsUrl()})`);
      };
      ws.onclose = (ev) => {
        if (ws !== this.ws) return;
        this.ws = null;
        this._stopCamera();
        if (this.state !== "closed" && this.state !== "error") {
          this.state = "closed";
          this._status(ev.code === 1012 ? "the server stopped" : `disconnected (code ${ev.code})`);
        }
      };
    }

    /** Live change: {prompt, blend_chunks, steps}; applies from the next chunk (answered by `updated`). */
    update(opts) {
      if (!this._live()) {
        this._status("not streaming: press Start first");
        return false;
      }
      const msg = { type: "update" };
      if (opts.prompt !== undefined && String(opts.prompt).trim()) {
        msg.prompt = String(opts.prompt);
        if (opts.blend_chunks !== undefined && opts.blend_chunks !== null) {
          msg.blend_chunks = Math.max(0, Math.round(Number(opts.blend_chunks)));
        }
      }
      if (opts.steps !== undefined && opts.steps !== null) msg.steps = Math.round(Number(opts.steps));
      if (Object.keys(msg).length === 1) return false;
      this.ws.send(JSON.stringify(msg));
      return true;
    }

    pause() {
      if (!this._live()) return;
      this.userPaused = true;
      this.ws.send(JSON.stringify({ type: "pause" }));
    }

    resume() {
      if (!this._live()) return;
      this.userPaused = false;
      if (!this.flowPaused) this.ws.send(JSON.stringify({ type: "resume" }));
    }

    /** End the session; the `closed` event brings the recording's download URL (if recording). */
    stop() {
      this._stopCamera();
      if (this.ws && this.ws.readyState === WebSocket.OPEN && this.session !== null) {
        this.state = "closing";
        this._status("closing…");
        this.ws.send(JSON.stringify({ type: "close" }));
      } else {
        this._teardown();
        this.state = "idle";
        this._status("stopped");
      }
    }

    stats() {
      const now = performance.now();
      this.drawTimes = this.drawTimes.filter((t) => now - t <= FPS_WINDOW_MS);
      const c = this.lastChunk;
      const buffered = this._bufferedMs(now);
      return {
        state: this.state,
        session: this.session,
        fps: this.drawTimes.length * (1000 / FPS_WINDOW_MS),
        streamFps: this.fps,
        ttffMs: this.ttffMs,
        firstFrameMs: this.firstFrameMs,
        chunkLatencyMs: c ? c.latency_s * 1000 : null,
        queueWaitMs: c ? c.queue_wait_s * 1000 : null,
        inputLatencyMs: c && c.input_latency_s !== null ? c.input_latency_s * 1000 : null,
        bufferedMs: buffered,
        framesReceived: this.framesReceived,
        framesDrawn: this.framesDrawn,
        chunks: this.chunks,
        serverDroppedChunks: this.serverDroppedChunks,
        serverDroppedFrames: this.serverDroppedFrames,
        lateDrops: this.lateDrops,
        gapFrames: this.gapFrames,
        rebuffers: this.rebuffers,
        flowPauses: this.flowPauses,
        inputSent: this.inputSent,
        inputSkipped: this.inputSkipped,
      };
    }

    // -- websocket messages

    _onEvent(msg, open) {
      switch (msg.type) {
        case "hello":
          this.hello = msg;
          this.openSentAt = performance.now();
          this.ws.send(JSON.stringify(open));
          this.state = "opening";
          this._status("opening session…");
          break;
        case "opened": {
          this.opened = msg;
          this.session = msg.session;
          this.fps = msg.fps;
          this.frameMs = 1000 / msg.fps;
          // One chunk interval of buffering absorbs the burst-per-chunk arrival (docs/protocol.md, Pacing).
          this.chunkMs = (msg.frames_per_chunk / msg.fps) * 1000;
          this.jitterMs = this.chunkMs;
          const canvas = byId("sr-canvas");
          if (canvas) {
            canvas.width = msg.width;
            canvas.height = msg.height;
          }
          this.state = "live";
          this._status(`live: session ${msg.session}, ${msg.width}x${msg.height} @ ${msg.fps} fps, ${msg.steps} steps`);
          if (msg.mode === "v2v") this._startInput(msg);
          break;
        }
        case "chunk":
          if (msg.session !== this.session) break;
          this.chunks += 1;
          this.lastChunk = msg;
          this.serverDroppedChunks = msg.drops;
          this.serverDroppedFrames = msg.dropped_frames;
          break;
        case "updated":
          this.updatesAcked += 1;
          this._status(`updated from chunk ${msg.next_chunk}: ${msg.prompt || ""}`);
          break;
        case "paused":
        case "resumed":
          if (this.userPaused === (msg.type === "paused")) this._status(`${msg.type} at chunk ${msg.next_chunk}`);
          break;
        case "error":
          this.errors.push(msg);
          this._status(`error (${msg.code}): ${msg.message}`);
          if (msg.request === "open") {
            this.state = "error"; // e.g. busy: no session was opened on this socket
            this._teardown();
          }
          break;
        case "closed":
          if (msg.session !== this.session) break;
          this.closedInfo = msg;
          this.state = "closed";
          this.recordingUrl = msg.recording || null;
          this.recordingFrames = msg.recording_frames || 0;
          this._setDownload(this.recordingUrl, this.recordingFrames);
          this._status(`closed (${msg.reason}): ${msg.frames} frames in ${msg.chunks} chunks`);
          this._teardown();
          break;
        default:
          break; // events of later protocol versions: ignored (docs/protocol.md, Versioning)
      }
    }

    _onFrame(buf) {
      if (buf.byteLength < HEADER_SIZE) return;
      const v = new DataView(buf);
      if (v.getUint32(0, false) !== MAGIC || v.getUint8(5) !== KIND_OUTPUT) return;
      if (v.getUint32(8, true) !== this.session) return; // a frame of an earlier session
      const format = v.getUint8(6);
      const frame = v.getUint32(16, true);
      const width = v.getUint16(24, true);
      const height = v.getUint16(26, true);
      const now = performance.now();
      this.framesReceived += 1;
      if (this.firstFrameMs === null) this.firstFrameMs = now - this.openSentAt;
      // Jitter buffer keyed on the frame number: anchor the clock so this frame is due one buffer from now, the
      // first time and whenever a frame arrives after its due time (generation slower than real time).
      if (this.t0 === null || this.t0 + frame * this.frameMs < now) {
        if (this.t0 !== null) this.rebuffers += 1;
        this.t0 = now + this.jitterMs - frame * this.frameMs;
      }
      const entry = { frame, due: this.t0 + frame * this.frameMs, bitmap: null, failed: false };
      let i = this.queue.length;
      while (i > 0 && this.queue[i - 1].frame > frame) i -= 1;
      this.queue.splice(i, 0, entry);
      const decoded =
        format === FORMAT.jpeg
          ? createImageBitmap(new Blob([new Uint8Array(buf, HEADER_SIZE)], { type: "image/jpeg" }))
          : createImageBitmap(this._imageData(buf, format, width, height));
      if (!this.flowPaused && this._live() && this._bufferedMs(now) > FLOW_PAUSE_CHUNKS * this.chunkMs) {
        this.flowPaused = true;
        this.flowPauses += 1;
        this.ws.send(JSON.stringify({ type: "pause" }));
      }
      decoded.then(
        (bitmap) => {
          entry.bitmap = bitmap;
        },
        (err) => {
          entry.failed = true;
          this.errors.push({ code: "decode", message: String(err) });
        },
      );
    }

    _imageData(buf, format, width, height) {
      if (format === FORMAT.rgba) return new ImageData(new Uint8ClampedArray(buf, HEADER_SIZE), width, height);
      const rgb = new Uint8Array(buf, HEADER_SIZE);
      const rgba = new Uint8ClampedArray(width * height * 4);
      for (let p = 0, q = 0; p < rgb.length; p += 3, q += 4) {
        rgba[q] = rgb[p];
        rgba[q + 1] = rgb[p + 1];
        rgba[q + 2] = rgb[p + 2];
        rgba[q + 3] = 255;
      }
      return new ImageData(rgba, width, height);
    }

    // -- drawing, paced by requestAnimationFrame

    _tick(now) {
      requestAnimationFrame((t) => this._tick(t));
      let pick = null;
      // Frames in order: show the newest that is due and decoded; older due ones are late and skipped.
      while (this.queue.length && this.queue[0].due <= now && (this.queue[0].bitmap || this.queue[0].failed)) {
        const entry = this.queue.shift();
        if (entry.failed) continue;
        if (pick) {
          pick.bitmap.close();
          this.lateDrops += 1;
        }
        pick = entry;
      }
      if (pick) this._draw(pick, now);
      if (this.flowPaused && this._bufferedMs(now) < FLOW_RESUME_CHUNKS * this.chunkMs) {
        this.flowPaused = false;
        if (this._live() && !this.userPaused) this.ws.send(JSON.stringify({ type: "resume" }));
      }
      if (now - this._lastStats >= STATS_INTERVAL_MS) {
        this._lastStats = now;
        this._renderStats();
      }
    }

    _draw(entry, now) {
      const canvas = byId("sr-canvas");
      if (canvas) {
        if (canvas.width !== entry.bitmap.width || canvas.height !== entry.bitmap.height) {
          canvas.width = entry.bitmap.width;
          canvas.height = entry.bitmap.height;
        }
        canvas.getContext("2d").drawImage(entry.bitmap, 0, 0);
      }
      entry.bitmap.close();
      if (this.lastFrameDrawn >= 0 && entry.frame > this.lastFrameDrawn + 1) {
        this.gapFrames += entry.frame - this.lastFrameDrawn - 1;
      }
      this.lastFrameDrawn = entry.frame;
      this.framesDrawn += 1;
      this.drawTimes.push(now);
      if (this.ttffMs === null && this.openSentAt !== null) this.ttffMs = now - this.openSentAt;
    }

    _renderStats() {
      const el = byId("sr-stats");
      if (!el) return;
      const s = this.stats();
      const ms = (x) => (x === null || x === undefined ? "–" : `${Math.round(x)} ms`);
      el.textContent =
        `${s.fps.toFixed(1)} / ${s.streamFps} fps · first frame ${ms(s.ttffMs)} · chunk latency ${ms(s.chunkLatencyMs)}` +
        (s.inputLatencyMs !== null ? ` · input latency ${ms(s.inputLatencyMs)}` : "") +
        ` · buffer ${ms(s.bufferedMs)}\n` +
        `frames ${s.framesDrawn} drawn / ${s.framesReceived} received · chunks ${s.chunks} · ` +
        `drops: server ${s.serverDroppedFrames} frames (${s.serverDroppedChunks} chunks), late ${s.lateDrops}, ` +
        `rebuffers ${s.rebuffers}, flow pauses ${s.flowPauses}` +
        (this.camera ? ` · webcam frames sent ${s.inputSent}, skipped ${s.inputSkipped}` : "");
    }

    // -- webcam input (video-to-video)

    async _startCamera() {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("this page is not a secure context: open it over https or on http://localhost");
      }
      this.camera = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
      const video = byId("sr-webcam");
      video.srcObject = this.camera;
      video.hidden = false;
      await video.play();
    }

    _startInput(opened) {
      const grab = document.createElement("canvas");
      grab.width = opened.width;
      grab.height = opened.height;
      const ctx = grab.getContext("2d");
      const video = byId("sr-webcam");
      let busy = false;
      const send = async () => {
        const ws = this.ws;
        if (busy || !ws || ws.readyState !== WebSocket.OPEN || !video.videoWidth) return;
        if (ws.bufferedAmount > MAX_INPUT_BUFFERED_BYTES) {
          this.inputSkipped += 1;
          return;
        }
        busy = true;
        try {
          // Centre crop to the session's aspect ratio, then scale to its size (the server wants exactly it).
          const scale = Math.max(grab.width / video.videoWidth, grab.height / video.videoHeight);
          const sw = grab.width / scale;
          const sh = grab.height / scale;
          ctx.drawImage(video, (video.videoWidth - sw) / 2, (video.videoHeight - sh) / 2, sw, sh, 0, 0, grab.width, grab.height);
          const blob = await new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", INPUT_JPEG_QUALITY));
          const jpeg = new Uint8Array(await blob.arrayBuffer());
          const msg = new Uint8Array(HEADER_SIZE + jpeg.length);
          const v = new DataView(msg.buffer);
          msg.set([0x53, 0x52, 0x54, 0x4d, 1, KIND_INPUT, FORMAT.jpeg, 0]);
          v.setUint32(8, this.session, true);
          v.setUint32(16, this.inputSent, true);
          v.setUint16(22, 1, true);
          v.setUint16(24, grab.width, true);
          v.setUint16(26, grab.height, true);
          msg.set(jpeg, HEADER_SIZE);
          if (ws.readyState === WebSocket.OPEN) {
            ws.send(msg);
            this.inputSent += 1;
          }
        } finally {
          busy = false;
        }
      };
      this.inputTimer = setInterval(send, 1000 / opened.fps);
    }

    _stopCamera() {
      if (this.inputTimer !== null) clearInterval(this.inputTimer);
      this.inputTimer = null;
      if (this.camera) this.camera.getTracks().forEach((track) => track.stop());
      this.camera = null;
      const video = byId("sr-webcam");
      if (video) {
        video.srcObject = null;
        video.hidden = true;
      }
    }

    // -- helpers

    _bufferedMs(now) {
      return this.queue.length ? Math.max(0, this.queue[this.queue.length - 1].due - now) : 0;
    }

    _live() {
      return this.ws && this.ws.readyState === WebSocket.OPEN && this.session !== null && this.state === "live";
    }

    _teardown() {
      this._stopCamera();
      const ws = this.ws;
      this.ws = null;
      if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
      for (const entry of this.queue) if (entry.bitmap) entry.bitmap.close();
      this.queue = [];
    }

    _wsUrl() {
      const el = byId("sr-player");
      const path = (el && el.dataset.wsPath) || "/ws";
      const url = new URL(path, window.location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      // A server with a token wants it in the websocket URL (browsers cannot add headers there).
      if (el && el.dataset.token) url.searchParams.set("token", el.dataset.token);
      return url.toString();
    }

    _withToken(path) {
      const el = byId("sr-player");
      if (!el || !el.dataset.token) return path;
      const url = new URL(path, window.location.href);
      url.searchParams.set("token", el.dataset.token);
      return url.pathname + url.search;
    }

    _setDownload(url, frames) {
      const link = byId("sr-download");
      if (!link) return;
      if (url) {
        link.href = this._withToken(url); // the page's cookie carries it too, unless the browser blocks cookies
        link.textContent = `Download MP4 (${frames} frames)`;
        link.hidden = false;
      } else {
        link.removeAttribute("href");
        link.hidden = true;
      }
    }

    _status(text) {
      const el = byId("sr-status");
      if (el) el.textContent = text;
    }

    _fail(text) {
      this.errors.push({ code: "client", message: text });
      this._status(text);
    }
  }

  window.streamPlayer = new StreamPlayer();
})();
