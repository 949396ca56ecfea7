/*! chatkit-secret.mjs: the ES-module build of chatkit-secret.js (same code, same options).
 *
 *   import { configure } from "./chatkit-secret.mjs";
 *   const api = await configure({ prefix: "/api/chatkit" });  // either backend
 *   const { control } = useChatKit({ api });
 * Hosted mode only, as before:
 *   const { control } = useChatKit({ api: { getClientSecret: createClientSecretFetcher() } });
 *
 * getClientSecret(currentClientSecret) ALWAYS mints a new secret (first load and refresh alike).
 */
const root = globalThis;
// Served by the extension at {CHATKIT_URL_PREFIX}/static/: the endpoint is next to it.
const DEFAULT_ENDPOINT = defaultEndpoint(import.meta.url);
const DEFAULT_PREFIX = defaultPrefix(import.meta.url);

// --- shared core: keep identical to chatkit-secret.js (a test compares them) ---
var RETRY_STATUSES = [503, 504];

/** An error from the secret endpoint: .status (0 = no answer), .code, .retryAfter (seconds or
 *  null), .requestId (quote it to the site owner) and a message fit to show to a visitor. */
class ChatKitSecretError extends Error {
  constructor(message, details) {
    super(message);
    var d = details || {};
    this.name = "ChatKitSecretError";
    this.status = typeof d.status === "number" ? d.status : 0;
    this.code = d.code || "error";
    this.retryAfter = typeof d.retryAfter === "number" ? d.retryAfter : null;
    this.requestId = d.requestId || null;
    if (d.cause !== undefined) {
      this.cause = d.cause;
    }
  }
}

function seconds(n) {
  return n === 1 ? "1 second" : n + " seconds";
}

/** Retry-After as whole seconds (delta-seconds or HTTP date), or null. */
function parseRetryAfter(value) {
  if (value === null || value === undefined || value === "") {
    return null;
  }
  var text = String(value).trim();
  if (/^\d+(\.\d+)?$/.test(text)) {
    return Math.max(0, Math.ceil(Number(text)));
  }
  var date = Date.parse(text);
  if (!isNaN(date)) {
    return Math.max(0, Math.ceil((date - Date.now()) / 1000));
  }
  return null;
}

function sleep(ms) {
  return new Promise(function (resolve) {
    setTimeout(resolve, ms);
  });
}

async function readJson(response) {
  try {
    var text = await response.text();
    var data = text ? JSON.parse(text) : null;
    return data && typeof data === "object" ? data : null;
  } catch (_err) {
    return null;
  }
}

function retryAfterOf(response, payload) {
  if (payload && typeof payload.retry_after === "number" && payload.retry_after >= 0) {
    return Math.ceil(payload.retry_after);
  }
  return parseRetryAfter(response.headers && response.headers.get("Retry-After"));
}

function defaultMessage(status) {
  if (status === 503) return "The chat service is busy. Try again shortly.";
  if (status === 504) return "The chat service did not answer in time. Try again shortly.";
  if (status === 403) return "This page may not start a chat.";
  if (status >= 500) return "The chat service is unavailable. Try again later.";
  return "Could not start the chat (HTTP " + status + ").";
}

/**
 * Returns `async getClientSecret(currentClientSecret)` for ChatKit's `api: { getClientSecret }`.
 *
 * Options:
 *   endpoint        URL of the secret endpoint (default: "secret" beside the prefix this
 *                   file was served from, e.g. "/api/chatkit/secret")
 *   fetch           fetch implementation (default the global fetch)
 *   retries         extra attempts after a 503/504 or a network error (default 2)
 *   backoffMs       first backoff; doubles each retry, with jitter (default 500)
 *   maxRetryDelayMs longest wait before a retry (default 8000); a Retry-After longer than this
 *                   is not waited for: the error is thrown with .retryAfter instead
 *   body            JSON body (object, or a function returning one), e.g. { workflow_id }
 *   credentials     fetch credentials mode (default "same-origin"; "include" cross-origin)
 *   headers         extra request headers (object)
 *   timeoutMs       per-attempt timeout (default 20000; 0 disables)
 *   onSecret        called with { clientSecret, expiresAt, expiresAfter, refresh } per mint
 */
function createClientSecretFetcher(options) {
  var opts = options || {};
  var endpoint = opts.endpoint || DEFAULT_ENDPOINT;
  var fetchImpl =
    opts.fetch ||
    function (url, init) {
      return root.fetch(url, init);
    };
  var retries = typeof opts.retries === "number" && opts.retries >= 0 ? opts.retries : 2;
  var backoffMs = typeof opts.backoffMs === "number" && opts.backoffMs >= 0 ? opts.backoffMs : 500;
  var maxRetryDelayMs = typeof opts.maxRetryDelayMs === "number" ? opts.maxRetryDelayMs : 8000;
  var credentials = opts.credentials || "same-origin";
  var timeoutMs = typeof opts.timeoutMs === "number" ? opts.timeoutMs : 20000;
  var onSecret = typeof opts.onSecret === "function" ? opts.onSecret : null;

  function backoff(attempt) {
    var base = backoffMs * Math.pow(2, attempt);
    return Math.min(maxRetryDelayMs, Math.round(base * (0.8 + Math.random() * 0.4)));
  }

  async function post() {
    var body = typeof opts.body === "function" ? await opts.body() : opts.body;
    var headers = { "Content-Type": "application/json", Accept: "application/json" };
    var extra = opts.headers || {};
    for (var name in extra) {
      if (Object.prototype.hasOwnProperty.call(extra, name)) {
        headers[name] = extra[name];
      }
    }
    var init = {
      method: "POST",
      credentials: credentials,
      cache: "no-store",
      headers: headers,
      body: JSON.stringify(body || {}),
    };
    var timer = null;
    if (timeoutMs > 0 && typeof AbortController === "function") {
      var controller = new AbortController();
      init.signal = controller.signal;
      timer = setTimeout(function () {
        controller.abort();
      }, timeoutMs);
    }
    try {
      return await fetchImpl(endpoint, init);
    } finally {
      if (timer !== null) {
        clearTimeout(timer);
      }
    }
  }

  // currentClientSecret is deliberately NOT returned: a refresh must mint a new secret.
  return async function getClientSecret(currentClientSecret) {
    var refresh = currentClientSecret !== null && currentClientSecret !== undefined;
    for (var attempt = 0; ; attempt++) {
      var response;
      try {
        response = await post();
      } catch (err) {
        if (attempt < retries) {
          await sleep(backoff(attempt));
          continue;
        }
        throw new ChatKitSecretError(
          "Could not reach the chat server. Check your connection and try again.",
          { status: 0, code: "network_error", cause: err }
        );
      }
      var payload = await readJson(response);
      var requestId =
        (payload && payload.request_id) ||
        (response.headers && response.headers.get("X-Request-ID")) ||
        null;
      if (response.ok) {
        var secret = payload && payload.client_secret;
        if (typeof secret !== "string" || !secret) {
          throw new ChatKitSecretError("The chat server answered without a client secret.", {
            status: response.status,
            code: "invalid_response",
            requestId: requestId,
          });
        }
        if (onSecret) {
          try {
            onSecret({
              clientSecret: secret,
              expiresAt: payload.expires_at,
              expiresAfter: payload.expires_after,
              refresh: refresh,
            });
          } catch (_err) {
            // an observer's bug must not break the chat
          }
        }
        return secret;
      }
      var status = response.status;
      var code = (payload && typeof payload.error === "string" && payload.error) || "http_" + status;
      var retryAfter = retryAfterOf(response, payload);
      if (status === 429) {
        throw new ChatKitSecretError(
          retryAfter !== null
            ? "Too many chat sessions. Try again in " + seconds(Math.max(1, retryAfter)) + "."
            : "Too many chat sessions. Try again later.",
          { status: status, code: code, retryAfter: retryAfter, requestId: requestId }
        );
      }
      if (RETRY_STATUSES.indexOf(status) !== -1 && attempt < retries) {
        var wait = retryAfter !== null ? retryAfter * 1000 : backoff(attempt);
        if (wait <= maxRetryDelayMs) {
          await sleep(wait);
          continue;
        }
      }
      var message = (payload && typeof payload.message === "string" && payload.message) || defaultMessage(status);
      throw new ChatKitSecretError(message, {
        status: status,
        code: code,
        retryAfter: retryAfter,
        requestId: requestId,
      });
    }
  };
}
/** "{prefix}/secret" when this file was loaded from "{prefix}/static/", else the default. */
function defaultEndpoint(url) {
  return defaultPrefix(url) + "/secret";
}

/** "{prefix}" when this file was loaded from "{prefix}/static/", else "/api/chatkit". */
function defaultPrefix(url) {
  var match = typeof url === "string" && /^(.*)\/static\/chatkit-secret\.m?js(?:[?#].*)?$/.exec(url);
  return match ? resolveUrl(match[1], match[1]) : "/api/chatkit"; // a path on the page's origin
}

// ----- server mode: chatkit-js talks to POST {prefix} through the fetch made here -----
// chatkit-js needs a domainKey; on localhost any value passes (OpenAI's samples use this one).
var DOMAIN_KEY_PLACEHOLDER = "domain_pk_localhost_dev";
// The request types the server answers with an event stream (every one calls the model).
var STREAMING_TYPES = ["threads.create", "threads.add_user_message", "threads.retry_after_item",
    "threads.add_client_tool_output"];

function chatMessage(status, retryAfter) {
  if (status === 429) {
    return retryAfter !== null
      ? "Too many messages. Try again in " + seconds(Math.max(1, retryAfter)) + "."
      : "Too many messages. Try again later.";
  }
  if (status === 503) return "The chat is busy. Try again shortly.";
  if (status === 404) return "No such conversation.";
  if (status === 403) return "This page may not use the chat.";
  if (status >= 500) return "The chat is unavailable. Try again later.";
  return "The chat could not answer (HTTP " + status + ").";
}

/** A refusal's text: the server's own message (it already names the wait), else ours. */
function refusal(response, payload) {
  var retryAfter = retryAfterOf(response, payload);
  var message = payload && typeof payload.message === "string" && payload.message;
  return new ChatKitSecretError(message || chatMessage(response.status, retryAfter), {
    status: response.status,
    code: (payload && typeof payload.error === "string" && payload.error) || "http_" + response.status,
    retryAfter: retryAfter,
    requestId:
      (payload && payload.request_id) || (response.headers && response.headers.get("X-Request-ID")) || null,
  });
}

function requestType(body) {
  if (typeof body !== "string") {
    return null;
  }
  try {
    var parsed = JSON.parse(body);
    return parsed && typeof parsed.type === "string" ? parsed.type : null;
  } catch (_err) {
    return null;
  }
}

function mergeHeaders(base, extra) {
  var headers = new root.Headers(base || {});
  var more = extra || {};
  for (var name in more) {
    if (Object.prototype.hasOwnProperty.call(more, name)) {
      headers.set(name, more[name]);
    }
  }
  return headers;
}

/** The refusal as the server itself words one inside a stream: a 200 holding one ChatKit
 *  `error` event with code "custom", which the widget shows in the thread. */
function errorStream(error) {
  var event = {
    type: "error",
    code: "custom",
    message: error.message,
    allow_retry: error.status === 0 || error.status === 429 || error.status >= 500,
  };
  return new root.Response("data: " + JSON.stringify(event) + "\n\n", {
    status: 200,
    headers: { "Content-Type": "text/event-stream", "Cache-Control": "no-store" },
  });
}

/** Calls `onFrame(event)` for every `data:` frame of an SSE body, as it arrives. */
async function readEvents(body, onFrame) {
  var reader = body.getReader();
  var decoder = new root.TextDecoder();
  var buffer = "";
  function flush(final) {
    var frames = buffer.split(/\r?\n\r?\n/);
    buffer = final ? "" : frames.pop();
    for (var i = 0; i < frames.length; i++) {
      var data = frames[i]
        .split(/\r?\n/)
        .filter(function (line) {
          return line.indexOf("data:") === 0;
        })
        .map(function (line) {
          return line.slice(line.charAt(5) === " " ? 6 : 5);
        })
        .join("\n");
      if (data) {
        var event;
        try {
          event = JSON.parse(data);
        } catch (_err) {
          continue;
        }
        onFrame(event);
      }
    }
  }
  for (;;) {
    var chunk = await reader.read();
    if (chunk.done) {
      buffer += decoder.decode();
      flush(true);
      return;
    }
    buffer += decoder.decode(chunk.value, { stream: true });
    flush(false);
  }
}

/** The stream passed on untouched; its `error` events are also told to `report`. */
function watchStream(response, report) {
  if (!response.body || typeof response.body.tee !== "function") {
    return response;
  }
  var branches = response.body.tee();
  var retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
  readEvents(branches[1], function (event) {
    if (event && event.type === "error") {
      report(
        new ChatKitSecretError(event.message || "The reply failed.", {
          status: response.status,
          code: event.code || "stream.error",
          retryAfter: retryAfter,
          requestId: response.headers.get("X-Request-ID"),
        })
      );
    }
  }).catch(function () {
    // the widget's branch reports its own read errors
  });
  return new root.Response(branches[0], {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  });
}

/**
 * Returns the `fetch` for chatkit-js's `api: { url, domainKey, fetch }` (server mode).
 *
 * It sends the visitor cookie (credentials "same-origin", or "include" cross-origin) and any
 * extra `headers`. A refused message (a JSON 429/503/404..., or no answer at all) becomes
 * what the server itself sends for an in-stream refusal, a 200 stream holding one ChatKit
 * `error` event with `code: "custom"` and readable text, which the widget shows in the
 * thread; a refused read throws a ChatKitSecretError with that text. `onError(err)` hears
 * every refusal, in-stream ones included (err.message, .status, .code, .retryAfter).
 *
 * Options: fetch, credentials, headers, onError.
 */
function createServerFetch(options) {
  var opts = options || {};
  var fetchImpl =
    opts.fetch ||
    function (url, init) {
      return root.fetch(url, init);
    };
  var credentials = opts.credentials || "same-origin";
  var onError = typeof opts.onError === "function" ? opts.onError : null;

  function report(error) {
    if (onError) {
      try {
        onError(error);
      } catch (_err) {
        // an observer's bug must not break the chat
      }
    }
  }

  return async function chatkitFetch(input, init) {
    var request = {};
    var given = init || {};
    for (var key in given) {
      if (Object.prototype.hasOwnProperty.call(given, key)) {
        request[key] = given[key];
      }
    }
    request.credentials = credentials;
    var body = given.body;
    if (typeof root.Request === "function" && input instanceof root.Request) {
      // fetch(request[, init]): the request's own headers and body, unless init replaces them
      request.headers = mergeHeaders(given.headers || input.headers, opts.headers);
      if (body === undefined && input.body !== null) {
        body = await input.clone().text();
      }
    } else {
      request.headers = mergeHeaders(given.headers, opts.headers);
    }
    var streaming = STREAMING_TYPES.indexOf(requestType(body)) !== -1;
    var response;
    try {
      response = await fetchImpl(input, request);
    } catch (err) {
      if (err && err.name === "AbortError") {
        throw err; // the widget cancelled: not a refusal
      }
      var unreachable = new ChatKitSecretError(
        "Could not reach the chat server. Check your connection and try again.",
        { status: 0, code: "network_error", cause: err }
      );
      report(unreachable);
      if (streaming) {
        return errorStream(unreachable);
      }
      throw unreachable;
    }
    if (response.ok) {
      return streaming && onError ? watchStream(response, report) : response;
    }
    var error = refusal(response, await readJson(response));
    report(error);
    if (streaming) {
      return errorStream(error);
    }
    throw error;
  };
}

function absoluteUrl(url) {
  var here = root.location && root.location.href;
  try {
    return here ? new root.URL(url, here).href : url;
  } catch (_err) {
    return url;
  }
}

/** `url` resolved against the config URL, as a path when it is on the page's own origin. */
function resolveUrl(url, base) {
  try {
    var resolved = new root.URL(url, base);
    if (root.location && resolved.origin === root.location.origin) {
      return resolved.pathname + resolved.search;
    }
    return resolved.href;
  } catch (_err) {
    return url;
  }
}

/**
 * Asks `GET {prefix}/config` which backend runs (this also issues the visitor cookie) and
 * resolves to chatkit-js's `api` options for it:
 *   hosted: { getClientSecret }          (createClientSecretFetcher with the same options)
 *   server: { url, domainKey, fetch }    (createServerFetch with the same options), plus
 *           uploadStrategy when the server takes attachments (GET {prefix}/config's
 *           `attachments` is then chatkit-js's composer.attachments)
 *
 * Options: prefix (default: where this file was served from, else "/api/chatkit"),
 * domainKey (default: the server's CHATKIT_DOMAIN_KEY, else a placeholder), fetch,
 * credentials, headers, onError (server mode), and createClientSecretFetcher's options.
 * Throws a ChatKitSecretError when the config cannot be read.
 */
async function configure(options) {
  var opts = options || {};
  var prefix = String(opts.prefix || DEFAULT_PREFIX).replace(/\/+$/, "");
  var configUrl = absoluteUrl(prefix + "/config");
  var fetchImpl =
    opts.fetch ||
    function (url, init) {
      return root.fetch(url, init);
    };
  var response;
  try {
    response = await fetchImpl(configUrl, {
      method: "GET",
      credentials: opts.credentials || "same-origin",
      cache: "no-store",
      headers: mergeHeaders({ Accept: "application/json" }, opts.headers),
    });
  } catch (err) {
    throw new ChatKitSecretError("Could not reach the chat server. Check your connection and try again.", {
      status: 0,
      code: "network_error",
      cause: err,
    });
  }
  var payload = await readJson(response);
  if (!response.ok) {
    throw refusal(response, payload);
  }
  var settings = {};
  for (var key in opts) {
    if (Object.prototype.hasOwnProperty.call(opts, key)) {
      settings[key] = opts[key];
    }
  }
  if (payload && payload.backend === "server" && typeof payload.url === "string") {
    var api = {
      url: resolveUrl(payload.url, configUrl),
      domainKey: opts.domainKey || payload.domainKey || DOMAIN_KEY_PLACEHOLDER,
      fetch: createServerFetch(settings),
    };
    if (payload.uploadStrategy) {
      // Attachments are on: chatkit-js uploads through attachments.create and its URL.
      api.uploadStrategy = payload.uploadStrategy;
    }
    return api;
  }
  if (payload && payload.backend === "hosted" && typeof payload.secretUrl === "string") {
    settings.endpoint = resolveUrl(payload.secretUrl, configUrl);
    return { getClientSecret: createClientSecretFetcher(settings) };
  }
  throw new ChatKitSecretError("The chat server's configuration is not one this helper knows.", {
    status: response.status,
    code: "invalid_response",
  });
}

/**
 * One ChatKit request without the widget (server mode): POSTs `{type, params}` to `api.url`
 * with `api.fetch`. A stream resolves to its events (each also given to `onEvent` as it
 * arrives); a JSON answer resolves to its parsed body. Options: onEvent, signal.
 */
async function send(api, type, params, options) {
  var opts = options || {};
  if (!api || typeof api.url !== "string") {
    throw new Error("send() needs the server mode api from configure()");
  }
  var fetchImpl =
    api.fetch ||
    function (url, init) {
      return root.fetch(url, init);
    };
  var response = await fetchImpl(api.url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream, application/json" },
    body: JSON.stringify({ type: type, params: params || {} }),
    signal: opts.signal,
  });
  var contentType = (response.headers && response.headers.get("Content-Type")) || "";
  if (contentType.indexOf("text/event-stream") === -1 || !response.body) {
    var payload = await readJson(response);
    if (!response.ok) {
      throw refusal(response, payload);
    }
    return payload;
  }
  var events = [];
  await readEvents(response.body, function (event) {
    events.push(event);
    if (typeof opts.onEvent === "function") {
      opts.onEvent(event);
    }
  });
  return events;
}
// --- end of shared core ---

export { ChatKitSecretError, createClientSecretFetcher, parseRetryAfter, configure, createServerFetch, send,
  DOMAIN_KEY_PLACEHOLDER };
export default { ChatKitSecretError, createClientSecretFetcher, parseRetryAfter, configure, createServerFetch, send,
  DOMAIN_KEY_PLACEHOLDER };
