// The node-oidc-provider recipe of docs/consumers.md, runnable: an authorization server whose dynamic
// client registration (RFC 7591) requires a software_statement issued by an ssa-server.
// tests/test_node_consumer.py runs it:
//   node provider.mjs --ssa-issuer http://127.0.0.1:8080 --port 3000 --lifetime 60
// It listens on 127.0.0.1 only, prints one JSON line {"issuer", "initial_access_token"} once it
// listens, and exits by itself after --lifetime seconds.
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    'ssa-issuer': { type: 'string' },
    port: { type: 'string' },
    lifetime: { type: 'string', default: '60' },
  },
});
if (!args['ssa-issuer'] || !/^\d+$/.test(args.port ?? '')) {
  console.error('usage: node provider.mjs --ssa-issuer URL --port N [--lifetime SECONDS]');
  process.exit(2);
}
const SSA_ISSUER = args['ssa-issuer'];

// --- recipe: begin (docs/consumers.md shows this part verbatim; tests/test_node_consumer.py checks) ---
import { createRemoteJWKSet, jwtVerify } from 'jose';
import Provider, { errors } from 'oidc-provider';

// SSA_ISSUER: the ssa-server's issuer URL, exactly as its SSAs' `iss` (e.g. 'https://ssa.example.com').
// jose caches the JWKS and fetches it again for an unknown kid (at most every 30 s).
const ssaKeys = createRemoteJWKSet(new URL(`${SSA_ISSUER}/jwks`));
const SSA_ALGS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512',
  'EdDSA', 'Ed25519']; // asymmetric only: never 'none' or HMAC
const refuse = (why) => new errors.InvalidSoftwareStatement(why); // 400 invalid_software_statement

async function askIssuer(path, init = {}) {
  try {
    return await fetch(`${SSA_ISSUER}${path}`, { ...init, signal: AbortSignal.timeout(5000) });
  } catch {
    throw refuse('the SSA issuer could not be asked about this software_statement'); // fail closed
  }
}

async function ssaRequired(ctx, properties) {
  const statement = properties.software_statement;
  if (typeof statement !== 'string') throw refuse('a software_statement is required');
  let payload;
  try {
    ({ payload } = await jwtVerify(statement, ssaKeys, {
      issuer: SSA_ISSUER, algorithms: SSA_ALGS, clockTolerance: 60, requiredClaims: ['jti', 'exp'],
    }));
  } catch (e) {
    throw refuse(`software_statement refused: ${e.code ?? 'ERR_JWT_INVALID'}`);
  }
  // A valid signature says nothing about revocation: ask, without changing anything.
  const jti = encodeURIComponent(String(payload.jti));
  const r = await askIssuer(`/ssa/status?jti=${jti}`);
  const status = r.status === 200 ? await r.json() : {};
  if (status.status !== 'ACTIVE') throw refuse(`software_statement is ${status.status ?? 'unknown'}`);
  // RFC 7591 §3.1.1: the statement's values take precedence over the request's.
  Object.assign(properties, { software_id: payload.software_id, org_id: payload.org_id });
  if (status.one_time_use) {
    // Use it up, atomically (a second registration with it is refused); check the metadata first
    // so that a registration refused for its metadata does not burn the SSA.
    await ctx.oidc.provider.Client.validate(properties);
    const used = await askIssuer('/ssa/validation', { method: 'POST', headers: { jti: String(payload.jti) } });
    if (used.status !== 200) throw refuse('software_statement was already used');
  }
}

const configuration = {
  extraClientMetadata: { properties: ['software_id', 'org_id'] },
  features: {
    registration: {
      enabled: true,
      initialAccessToken: true, // policies hang on initial access tokens
      policies: { 'ssa-required': ssaRequired },
    },
  },
};
// Every initial access token you hand out carries the policy:
//   const iat = await new provider.InitialAccessToken({ policies: ['ssa-required'] }).save();
// --- recipe: end ---

const issuer = `http://127.0.0.1:${args.port}`;
const provider = new Provider(issuer, configuration);
const initialAccessToken = await new provider.InitialAccessToken({ policies: ['ssa-required'] }).save();
const server = provider.listen(Number(args.port), '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ issuer, initial_access_token: initialAccessToken })}\n`);
});
server.on('error', (e) => {
  console.error(`provider.mjs: ${e.message}`);
  process.exit(1);
});
// Never outlive the test that started us, even if it is killed before it stops us.
setTimeout(() => process.exit(0), Number(args.lifetime) * 1000);
