// refold-sdk: write refold projection plugins in JavaScript.
//
// This entry imports the component's `log` interface (`refold:plugin/log`),
// which exists only inside the component built by componentize-js; under
// plain Node import `refold-sdk/core` instead (or map the specifier, see
// ../tests/wit-stub.js).
import { log as witLog } from 'refold:plugin/log@0.2.0';
import { createExports, makeLog } from './core.js';

export {
  Event, PluginError, upsert, del, fields, parseJson, stringifyJson, describeException,
} from './core.js';

/** Log through the host (it tags each line with the plugin's name and version). */
export const log = makeLog((level, message) => witLog(level, message));

/**
 * The `projector` world's exports for a plugin. Re-export them from the
 * plugin's entry module:
 *
 *   export const { describe, init, fold, project } = definePlugin({ ... });
 */
export function definePlugin(plugin) {
  return createExports(plugin, { log: witLog });
}
