/**
 * OHIF configuration of a Hilum node (served at /app-config.js; OHIF itself at /).
 *
 * The only data source is the node's own DICOMweb gateway on the same origin (/dicom-web): the
 * browser's session cookie authenticates every request, the gateway enforces roles and talks to
 * the archive with credentials that never reach the browser. Nothing is loaded from elsewhere.
 *
 * The data source settings follow Orthanc's own OHIF plugin and work with Debian's Orthanc 1.10
 * + DICOMweb plugin 1.7 as with newer ones:
 * - singlepart 'bulkdata,video': bulk data is asked as single-part application/octet-stream.
 *   Plugins before 1.16 refuse that (400); the gateway then asks for the multipart form and hands
 *   back the single part, so OHIF gets the same answer from an old or a new archive.
 * - acceptHeader for frames: multipart octet-stream with transfer-syntax=*, unquoted
 *   (omitQuotationForMultipartRequest); every plugin version accepts it and it avoids transcoding.
 * - bulkDataURI relative to the study: the gateway makes Orthanc write BulkDataURIs that point
 *   back at this origin (Forwarded header).
 * - qidoSupportsIncludeField false, supportsFuzzyMatching false, supportsWildcard true: what
 *   Orthanc's QIDO-RS implements.
 */
window.config = {
  name: 'hilum',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  investigationalUseDialog: { option: 'configure', days: 30 },
  maxNumRequests: { interaction: 100, thumbnail: 75, prefetch: 25 },
  showErrorDetails: 'dev',
  defaultDataSourceName: 'hilum',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'hilum',
      configuration: {
        friendlyName: 'Hilum node',
        name: 'hilum',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        supportsStow: true,
        dicomUploadEnabled: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: true,
        singlepart: 'bulkdata,video',
        acceptHeader: ['multipart/related; type=application/octet-stream; transfer-syntax=*'],
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {
          enabled: true,
          relativeResolution: 'studies',
        },
      },
    },
  ],
  httpErrorHandler: error => {
    // A 401 means the session ended (idle timeout, sign-out): back to the node's sign-in page.
    if (error && error.status === 401) {
      window.location.assign('/login?next=' + encodeURIComponent(window.location.pathname + window.location.search));
    }
  },
};
