// Lets plain Node import modules that import the component's WIT interfaces:
// `refold:plugin/log@0.2.0` resolves to a stub whose `log` appends to
// globalThis.__refoldLog (an array of [level, message]).
// Use: `await import('./wit-stub.js')` before importing a plugin entry module.
import { register } from 'node:module';

globalThis.__refoldLog = [];
const stub = 'export function log(level, message) { globalThis.__refoldLog.push([level, message]); }';
const hooks = `
export async function resolve(specifier, context, next) {
  if (specifier.startsWith('refold:plugin/log')) {
    return { url: 'data:text/javascript,' + encodeURIComponent(${JSON.stringify(stub)}), shortCircuit: true };
  }
  return next(specifier, context);
}`;
register('data:text/javascript,' + encodeURIComponent(hooks));
